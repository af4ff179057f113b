"""Evaluation runs with the paper's protocol: sample, grade, write per-problem results, summarise, compare."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._paths import missing_local_path
from .benchmarks import (
    TINY_BENCHMARK,
    BenchmarkSource,
    BenchmarkUnavailableError,
    benchmark_names,
    load_benchmark,
    parse_benchmark_arg,
)
from .generation import (
    DEFAULT_PROMPT_TEMPLATE,
    SamplingSettings,
    TransformersGenerator,
    VLLMGenerator,
    prompt_template_hash,
    render_prompt,
    resolve_backend,
    stop_token_ids,
)
from .grading import MathVerifyGrader
from .passk import mean_accuracy, mean_pass_at_k

RESULTS_FILE = "results.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PROTOCOL_FILE = "protocol.json"

# Two runs are comparable only when all of these agree.
PROTOCOL_FIELDS = ("n", "k", "temperature", "top_p", "max_new_tokens", "prompt_template_hash")
# A run resumes into an output directory only when the samples already there were drawn the same way. `k` is not
# among them: it only changes the summary, which is recomputed from the samples.
_RESUME_FIELDS = ("model", "n", "temperature", "top_p", "max_new_tokens", "prompt_template_hash")

DEFAULT_BATCH_SIZE = {"transformers": 2, "vllm": 256}


class EvaluationError(ValueError):
    """A user-facing error of an evaluation run, e.g. incompatible settings or results."""


class ProtocolMismatchError(EvaluationError):
    """Two result sets (or a run and its output directory) were produced under different protocols."""


@dataclass
class EvalConfig:
    """
    Settings of an evaluation run, and the options of `trl-eopd eval` (parsed with
    [`~transformers.HfArgumentParser`]). The defaults are the paper's protocol.

    Args:
        model (`str`):
            Checkpoint path or Hub id. Required; `None` only so that `trl-eopd eval --compare` can go without it.
        benchmarks (`list[str]`, *optional*, defaults to all six built-in benchmarks):
            Built-in benchmark names (see [`benchmark_names`]), `"TinyMath"` (a smoke test shipped with the package)
            or `NAME=path.jsonl` entries. An entry may hold several, comma-separated, as on the command line. `None`
            means all six; `trl-eopd eval` gives a `tiny://` model `TinyMath` instead.
        output_dir (`str` or `None`, *optional*):
            Where `results.jsonl`, `summary.json`, `summary.md` and `protocol.json` go; `eval_results/<model name>`
            by default. A run resumes from the results already there.
        n (`int`, *optional*, defaults to `8`):
            Samples per problem.
        k (`int` or `None`, *optional*):
            k of Pass@k; defaults to `n`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; 0 decodes greedily.
        top_p (`float`, *optional*, defaults to `0.8`):
            Nucleus sampling mass.
        max_new_tokens (`int`, *optional*, defaults to `8192`):
            Length limit of a completion.
        limit (`int` or `None`, *optional*):
            Evaluate only the first `limit` problems of each benchmark.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"vllm"`, `"transformers"`, or `"auto"` (vLLM when installed and a GPU is visible).
        seed (`int`, *optional*, defaults to `0`):
            Random seed.
        batch_size (`int` or `None`, *optional*):
            Problems per generation call (each gives `n` sequences); 2 for transformers and 256 for vLLM by default.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weights dtype.
        tokenizer (`str` or `None`, *optional*):
            Tokenizer checkpoint; defaults to `model`.
        prompt_template (`str`, *optional*, defaults to `DEFAULT_PROMPT_TEMPLATE`):
            User message with a `{problem}` placeholder.
        use_chat_template (`bool`, *optional*, defaults to `True`):
            Apply the tokenizer's chat template when it has one.
        chat_template_kwargs (`dict`, `str` or `None`, *optional*):
            Extra chat-template variables, e.g. `{"enable_thinking": False}`, or the same as a JSON object string (as
            given on the command line); part of the prompt's hash.
    """

    model: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint directory or Hugging Face Hub id to evaluate, or `tiny://student` / `tiny://teacher` "
            "(the tiny local models of `trl-eopd train`, built on first use; they answer nothing right, but check "
            "the pipeline)."
        },
    )
    benchmarks: list[str] = field(
        default_factory=benchmark_names,
        metadata={
            "help": (
                f"Benchmarks, space- or comma-separated: {', '.join(benchmark_names())} (case-insensitive), "
                f"{TINY_BENCHMARK} (8 easy problems shipped with trl-eopd, to check the pipeline), or NAME=path.jsonl "
                f"for a local file with problem/question and answer columns (default: all six; {TINY_BENCHMARK} for "
                "a tiny:// model)."
            ),
            "metavar": "NAME[=PATH]",
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where results.jsonl, summary.json and summary.md go (default: eval_results/<model name>)."},
    )
    n: int = field(default=8, metadata={"help": "Samples per problem (default: %(default)s)."})
    k: int | None = field(default=None, metadata={"help": "k of Pass@k (at most --n; defaults to --n)."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; 0 decodes greedily (default: %(default)s)."}
    )
    top_p: float = field(
        default=0.8, metadata={"help": "Nucleus sampling mass; top-k is always off (default: %(default)s)."}
    )
    max_new_tokens: int = field(
        default=8192, metadata={"help": "Length limit of each completion (default: %(default)s)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems of each benchmark."})
    backend: str = field(
        default="auto",
        metadata={
            "help": (
                "Generation backend; auto uses vLLM when it is installed and a GPU is visible (default: %(default)s)."
            ),
            "choices": ["auto", "vllm", "transformers"],
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed (default: %(default)s)."})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": (
                "Problems per generation call, each giving n sequences (default: 2 for transformers, 256 for vLLM)."
            )
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype; auto keeps the checkpoint's (default: %(default)s).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer checkpoint (default: --model)."})
    prompt_template: str = field(
        default=DEFAULT_PROMPT_TEMPLATE,
        metadata={
            "help": (
                "User message with a {problem} placeholder; its hash is part of the protocol "
                "(default: ask to reason step by step and box the final answer)."
            )
        },
    )
    use_chat_template: bool = field(
        default=True,
        metadata={
            "help": (
                "Whether to wrap the message in the tokenizer's chat template when it has one (default: yes; "
                "--no-chat-template turns it off)."
            )
        },
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Extra chat-template variables as a JSON object, e.g. '{\"enable_thinking\": false}' for Qwen3.",
            "metavar": "JSON",
        },
    )
    sources: list[BenchmarkSource] = field(init=False, repr=False)

    def __post_init__(self):
        if not self.model:
            raise EvaluationError("--model is required (or use --compare RUN_A RUN_B).")
        # Before any benchmark is downloaded: a mistyped path would otherwise surface as a Hub error about it.
        _check_checkpoint(self.model, "--model")
        if self.tokenizer is not None:
            _check_checkpoint(self.tokenizer, "--tokenizer")
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.model)
        if isinstance(self.chat_template_kwargs, str):
            self.chat_template_kwargs = _json_object(self.chat_template_kwargs)
        if self.benchmarks is None:
            self.benchmarks = benchmark_names()
        self.benchmarks = [part.strip() for entry in self.benchmarks for part in entry.split(",") if part.strip()]
        if self.k is None:
            self.k = self.n
        if self.n < 1:
            raise EvaluationError(f"--n must be at least 1, got {self.n}.")
        if not 1 <= self.k <= self.n:
            raise EvaluationError(
                f"--k must be between 1 and --n: Pass@k draws k of the n samples, got k={self.k} > n={self.n}."
                if self.k > self.n
                else f"--k must be at least 1, got {self.k}."
            )
        if self.limit is not None and self.limit < 1:
            raise EvaluationError(f"--limit must be at least 1, got {self.limit}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise EvaluationError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if "{problem}" not in self.prompt_template:
            raise EvaluationError("The prompt template needs a {problem} placeholder.")
        if not self.benchmarks:
            raise EvaluationError("Give at least one benchmark.")
        try:
            self.sources = [parse_benchmark_arg(name) for name in self.benchmarks]
        except ValueError as error:
            raise EvaluationError(str(error)) from error
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise EvaluationError(f"Benchmark(s) given twice: {', '.join(duplicates)}.")


def _check_checkpoint(name_or_path: str, option: str) -> None:
    """A local path given as a checkpoint exists and is a model folder (a Hub id is left to the Hub)."""
    if missing_local_path(name_or_path):
        raise EvaluationError(
            f"{option} {name_or_path!r} does not exist: give a checkpoint folder (saved with `save_pretrained`), a "
            "Hub id such as Qwen/Qwen3-1.7B, or tiny://student."
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in ("config.json", "tokenizer_config.json")):
        raise EvaluationError(
            f"{option} {name_or_path!r} is a folder but not a checkpoint (it has no config.json): give the folder a "
            "model was saved to with `save_pretrained`."
        )


def default_output_dir(model: str) -> str:
    """`eval_results/<last part of the model path or Hub id>`, with characters unsafe in a folder name replaced."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/\\").split("/")[-1]) or "model"
    return f"eval_results/{name}"


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise EvaluationError(f"argument --chat-template-kwargs: not valid JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise EvaluationError("argument --chat-template-kwargs: expected a JSON object")
    return parsed


def _protocol(config: EvalConfig, chat: bool) -> dict[str, Any]:
    return {
        "n": config.n,
        "k": config.k,
        "temperature": float(config.temperature),
        "top_p": float(config.top_p),
        "max_new_tokens": config.max_new_tokens,
        "prompt_template_hash": prompt_template_hash(config.prompt_template, chat, config.chat_template_kwargs),
        "prompt_template": config.prompt_template,
        "chat_template": chat,
        "chat_template_kwargs": config.chat_template_kwargs or {},
    }


_FIELD_LABELS = {"prompt_template_hash": "prompt (template hash)"}


def _differences(a: dict, b: dict, fields: tuple[str, ...]) -> list[str]:
    return [
        f"{_FIELD_LABELS.get(name, name)} ({a.get(name)!r} vs {b.get(name)!r})"
        for name in fields
        if a.get(name) != b.get(name)
    ]


def _read_results(path: Path) -> dict[tuple[str, str], dict]:
    """Records already in `path`, keyed by (benchmark, id). A torn last line from an interrupted write is dropped."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        # The last append was cut off mid-line; drop it so the next append starts on a fresh line.
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    records = {}
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records[(record["benchmark"], str(record["id"]))] = record
    return records


def _check_resume(output_dir: Path, run_info: dict[str, Any]) -> dict[str, Any]:
    """Refuse to mix samples drawn under other settings into `output_dir`; return the previous run's settings."""
    path = output_dir / PROTOCOL_FILE
    if not path.exists() or not (output_dir / RESULTS_FILE).exists():
        return {}
    previous = json.loads(path.read_text())
    previous_info = {**previous.get("protocol", {}), "model": _model_key(previous.get("model"))}
    differences = _differences(previous_info, {**run_info, "model": _model_key(run_info["model"])}, _RESUME_FIELDS)
    if differences:
        raise ProtocolMismatchError(
            f"{output_dir} holds results sampled with different settings: {'; '.join(differences)}. "
            "Use another --output-dir, or rerun with the same settings to resume."
        )
    return previous.get("settings", {})


def _model_key(model: str | None) -> str | None:
    # "./ckpt" and "/abs/ckpt" name the same local checkpoint; a Hub id is kept as written.
    return os.path.realpath(model) if model and os.path.exists(model) else model


def _summarise(records: list[dict], k: int) -> dict[str, Any]:
    counts = [(record["n"], record["c"]) for record in records]
    tokens = [t for record in records for t in record.get("num_tokens", [])]
    finished = [f for record in records for f in record.get("finished", [])]
    return {
        "num_problems": len(records),
        "avg_at_n": 100.0 * mean_accuracy(counts),
        "pass_at_k": 100.0 * mean_pass_at_k(counts, k),
        "mean_completion_tokens": sum(tokens) / len(tokens) if tokens else float("nan"),
        "truncated_fraction": 1.0 - sum(finished) / len(finished) if finished else float("nan"),
    }


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def format_summary_table(summary: dict[str, Any]) -> str:
    """
    Render a summary as the paper's table: one row per benchmark with Avg@n and Pass@k in percent.

    Args:
        summary (`dict`):
            The contents of `summary.json`.

    Returns:
        `str`: A markdown table.
    """
    n, k = summary["protocol"]["n"], summary["protocol"]["k"]
    lines = [f"| Benchmark | Avg@{n} | Pass@{k} | Problems |", "|---|---:|---:|---:|"]
    rows = list(summary["benchmarks"].items())
    if len(rows) > 1:
        rows.append(("Average", summary["average"]))
    for name, row in rows:
        lines.append(f"| {name} | {_fmt(row['avg_at_n'])} | {_fmt(row['pass_at_k'])} | {row['num_problems']} |")
    return "\n".join(lines)


def _summary_markdown(summary: dict[str, Any]) -> str:
    p = summary["protocol"]
    return (
        f"# Evaluation of `{summary['model']}`\n\n"
        f"{format_summary_table(summary)}\n\n"
        f"Protocol: n={p['n']}, k={p['k']}, temperature={p['temperature']}, top_p={p['top_p']}, "
        f"max_new_tokens={p['max_new_tokens']}, prompt template {p['prompt_template_hash']} "
        f"({'chat template' if p['chat_template'] else 'plain text'}), "
        f"graded with math-verify; Pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k).\n"
    )


def run_evaluation(config: EvalConfig, generator=None, progress: bool = True) -> dict[str, Any]:
    """
    Evaluate a checkpoint on the configured benchmarks, resuming from any results already in `output_dir`.

    Each problem's `n` completions, their grades and `c` are appended to `results.jsonl` and flushed as soon as the
    problem is done, so an interrupted run loses at most the batch in flight. Problems already there are skipped, and
    the model is not even loaded when nothing is left to sample.

    Args:
        config ([`EvalConfig`]):
            Run settings.
        generator (*optional*):
            Object with a `generate(prompt_ids) -> list[list[Completion]]` method to sample with instead of loading
            the model; useful in tests.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar per benchmark.

    Returns:
        `dict`: The summary, as written to `summary.json`.
    """
    from transformers import AutoTokenizer

    # Every benchmark first, so that a missing file or an unreachable Hub fails at once rather than after the model is
    # loaded, or hours in.
    problems = _load_problems(config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = config.tokenizer or config.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as error:
        option = "--tokenizer" if config.tokenizer else "--model"
        raise EvaluationError(f"cannot load a tokenizer from {option} {tokenizer_path!r}: {error}") from error
    chat = bool(config.use_chat_template and getattr(tokenizer, "chat_template", None))
    protocol = _protocol(config, chat)
    previous_settings = _check_resume(output_dir, {"model": config.model, **protocol})

    results_path = output_dir / RESULTS_FILE
    done = _read_results(results_path)
    pending = {name: [p for p in items if (name, p["id"]) not in done] for name, items in problems.items()}

    backend, stop_ids = None, []
    if any(pending.values()):
        generator, backend, stop_ids = _sampler(config, tokenizer, tokenizer_path, chat, generator)
    batch_size = config.batch_size or DEFAULT_BATCH_SIZE.get(backend or "transformers")
    if not any(pending.values()) and previous_settings:
        # Nothing was sampled this time: keep the record of how the samples were drawn.
        backend = previous_settings.get("backend")
        batch_size = previous_settings.get("batch_size", batch_size)
        stop_ids = previous_settings.get("stop_token_ids", stop_ids)
    settings = {
        "backend": backend,
        "seed": config.seed,
        "dtype": config.dtype,
        "batch_size": batch_size,
        "limit": config.limit,
        "tokenizer": tokenizer_path,
        "stop_token_ids": stop_ids,
        "grader": _grader_version(),
    }
    (output_dir / PROTOCOL_FILE).write_text(
        json.dumps({"model": config.model, "protocol": protocol, "settings": settings}, indent=2) + "\n"
    )

    _sample_and_grade(pending, done, results_path, generator, tokenizer, config, chat, batch_size, progress)
    summary = _summary(config, protocol, settings, problems, done)
    (output_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / SUMMARY_MD).write_text(_summary_markdown(summary))
    return summary


def _load_problems(config: EvalConfig) -> dict[str, list[dict]]:
    """Every configured benchmark's problems (cut to `config.limit`), or an `EvaluationError` saying what is missing."""
    problems = {}
    for source in config.sources:
        try:
            loaded = load_benchmark(source)
        except BenchmarkUnavailableError as error:
            raise EvaluationError(str(error)) from error
        except Exception as error:
            if source.path is None:
                # Offline, the Hub client raises its own error types; point to the local-file way out.
                raise _hub_error(source, error) from error
            if isinstance(error, (OSError, ValueError)):
                raise EvaluationError(str(error)) from error
            raise
        problems[source.name] = loaded[: config.limit] if config.limit is not None else loaded
    return problems


def _sampler(config: EvalConfig, tokenizer, tokenizer_path: str, chat: bool, generator):
    """`(generator, backend, stop_ids)`: the given generator (tests), or one loading the model on the chosen backend."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(config.model)
    except (OSError, ValueError):
        generation_config = None
    stop_ids = stop_token_ids(tokenizer, generation_config, chat=chat)
    if generator is not None:
        return generator, None, stop_ids
    backend = resolve_backend(config.backend)
    sampling = SamplingSettings(
        n=config.n,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
    )
    try:
        if backend == "vllm":
            generator = VLLMGenerator(config.model, tokenizer_path, sampling, stop_ids, dtype=config.dtype)
        else:
            generator = TransformersGenerator(config.model, tokenizer, sampling, stop_ids, dtype=config.dtype)
    except OSError as error:  # what transformers raises for a checkpoint without weights, or one it cannot find
        raise EvaluationError(f"cannot load the model --model {config.model!r}: {error}") from error
    return generator, backend, stop_ids


def _sample_and_grade(pending, done, results_path, generator, tokenizer, config, chat, batch_size, progress) -> None:
    """Sample and grade every pending problem, appending each record to `results_path` as soon as it is done."""
    from tqdm.auto import tqdm

    grader = MathVerifyGrader()
    with results_path.open("a", encoding="utf-8") as results_file:
        for name, items in pending.items():
            if not items:
                continue
            bar = tqdm(total=len(items), desc=name, unit="problem", disable=not progress)
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                prompt_ids = []
                for problem in batch:
                    text, _ = render_prompt(
                        tokenizer, problem["problem"], config.prompt_template, chat, config.chat_template_kwargs
                    )
                    prompt_ids.append(tokenizer(text, add_special_tokens=not chat)["input_ids"])
                samples = generator.generate(prompt_ids)
                for problem, completions in zip(batch, samples, strict=True):
                    record = _graded_record(name, problem, completions, grader)
                    results_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                    results_file.flush()
                    done[(name, problem["id"])] = record
                bar.update(len(batch))
            bar.close()
        os.fsync(results_file.fileno())


def _graded_record(benchmark: str, problem: dict, completions, grader) -> dict[str, Any]:
    grades = [grader.grade(completion.text, problem["answer"]) for completion in completions]
    return {
        "benchmark": benchmark,
        "id": problem["id"],
        "problem": problem["problem"],
        "answer": problem["answer"],
        "completions": [completion.text for completion in completions],
        "extracted": [grade.extracted for grade in grades],
        "correct": [grade.correct for grade in grades],
        "num_tokens": [completion.num_tokens for completion in completions],
        "finished": [completion.finished for completion in completions],
        "n": len(completions),
        "c": sum(grade.correct for grade in grades),
    }


def _summary(config: EvalConfig, protocol: dict, settings: dict, problems: dict, done: dict) -> dict[str, Any]:
    per_benchmark = {
        name: _summarise([done[(name, p["id"])] for p in items], config.k) for name, items in problems.items()
    }
    average = {
        key: sum(row[key] for row in per_benchmark.values()) / len(per_benchmark)
        for key in ("avg_at_n", "pass_at_k", "mean_completion_tokens", "truncated_fraction")
    }
    average["num_problems"] = sum(row["num_problems"] for row in per_benchmark.values())
    return {
        "model": config.model,
        "protocol": protocol,
        "settings": settings,
        "benchmarks": per_benchmark,
        # Macro average over benchmarks, the way papers average a table's columns.
        "average": average,
    }


def _hub_error(source: BenchmarkSource, error: Exception) -> EvaluationError:
    return EvaluationError(
        f"Could not load {source.name} from the Hugging Face Hub ({source.spec.hub_id}): {error}. "
        f"Offline? Give a local copy as {source.name}=path.jsonl."
    )


def _grader_version() -> str:
    try:
        from importlib.metadata import version

        return f"math-verify {version('math-verify')}"
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "math-verify"


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """
    Read a run's summary, given its output directory or its `summary.json`.

    Args:
        path (`str` or `os.PathLike`):
            Results directory or summary file.

    Returns:
        `dict`: The summary.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_JSON
    if not path.is_file():
        raise EvaluationError(f"No evaluation summary at {str(path)!r}: give a results directory or its summary.json.")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path} is not a JSON evaluation summary: {error}") from error
    if not isinstance(summary, dict) or "protocol" not in summary or "benchmarks" not in summary:
        raise EvaluationError(f"{path} is not an evaluation summary (it lacks 'protocol' and 'benchmarks').")
    return summary


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> dict[str, Any]:
    """
    Per-benchmark differences (b - a) of Avg@n and Pass@k between two runs of the same protocol.

    Args:
        run_a (`str` or `os.PathLike`):
            Baseline results directory or summary file.
        run_b (`str` or `os.PathLike`):
            The other run.

    Returns:
        `dict`: `protocol`, `model_a`, `model_b`, `rows` (one dict per benchmark present in both runs, with `a`, `b`
        and `delta` for `avg_at_n` and `pass_at_k`), and `only_a`/`only_b`, the benchmarks found in one run only.

    Raises:
        [`ProtocolMismatchError`]: When n, k, temperature, top_p, max_new_tokens or the prompt differ; the message
        names each differing field.
    """
    a, b = load_summary(run_a), load_summary(run_b)
    differences = _differences(a["protocol"], b["protocol"], PROTOCOL_FIELDS)
    if differences:
        raise ProtocolMismatchError(
            f"Cannot compare {run_a} and {run_b}: they were evaluated under different protocols, differing in "
            + "; ".join(differences)
            + "."
        )
    rows = []
    for name in a["benchmarks"]:
        if name not in b["benchmarks"]:
            continue
        row_a, row_b = a["benchmarks"][name], b["benchmarks"][name]
        row = {"benchmark": name, "num_problems_a": row_a["num_problems"], "num_problems_b": row_b["num_problems"]}
        for metric in ("avg_at_n", "pass_at_k"):
            row[metric] = {"a": row_a[metric], "b": row_b[metric], "delta": row_b[metric] - row_a[metric]}
        rows.append(row)
    return {
        "protocol": {name: a["protocol"][name] for name in PROTOCOL_FIELDS},
        "model_a": a.get("model"),
        "model_b": b.get("model"),
        "rows": rows,
        "only_a": [name for name in a["benchmarks"] if name not in b["benchmarks"]],
        "only_b": [name for name in b["benchmarks"] if name not in a["benchmarks"]],
    }


def format_comparison(comparison: dict[str, Any]) -> str:
    """
    Render [`compare_runs`]'s result as a markdown table, with signed differences.

    Args:
        comparison (`dict`):
            Output of [`compare_runs`].

    Returns:
        `str`: The table, followed by notes on benchmarks present in one run only or with different problem counts.
    """
    n, k = comparison["protocol"]["n"], comparison["protocol"]["k"]
    lines = [
        f"a: {comparison['model_a']}",
        f"b: {comparison['model_b']}",
        "",
        f"| Benchmark | Avg@{n} a | Avg@{n} b | Δ Avg@{n} | Pass@{k} a | Pass@{k} b | Δ Pass@{k} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in comparison["rows"]:
        avg, passk = row["avg_at_n"], row["pass_at_k"]
        lines.append(
            f"| {row['benchmark']} | {_fmt(avg['a'])} | {_fmt(avg['b'])} | {avg['delta']:+.2f} "
            f"| {_fmt(passk['a'])} | {_fmt(passk['b'])} | {passk['delta']:+.2f} |"
        )
    notes = []
    for row in comparison["rows"]:
        if row["num_problems_a"] != row["num_problems_b"]:
            notes.append(
                f"note: {row['benchmark']} has {row['num_problems_a']} problems in a but {row['num_problems_b']} in b."
            )
    for side in ("a", "b"):
        if comparison[f"only_{side}"]:
            notes.append(f"note: only in {side}: {', '.join(comparison[f'only_{side}'])}.")
    return "\n".join(lines + ([""] + notes if notes else []))
