"""The paper's six math benchmarks: where they live on the Hugging Face Hub, and how to read them or a local file.

A seventh, `TinyMath`, ships with the package: eight easy problems for checking the pipeline without a download (the
default for `tiny://` models), never a measurement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .grading import last_boxed_content, strip_math_delimiters


@dataclass(frozen=True)
class BenchmarkSpec:
    """
    Where a benchmark lives on the Hub and which columns hold what.

    Args:
        name (`str`):
            Display name, as in the paper's tables.
        hub_id (`str`):
            Dataset repository id on the Hugging Face Hub.
        split (`str`):
            Split to read.
        problem_field (`str`):
            Column with the problem statement.
        answer_field (`str`):
            Column with the reference answer. A list is joined with ", "; a number is written out as text.
        id_field (`str` or `None`, *optional*):
            Column with a stable problem id; the row index is used when it is `None` or missing.
        config (`str` or `None`, *optional*):
            Dataset configuration name, if the repository has several.
    """

    name: str
    hub_id: str
    split: str
    problem_field: str
    answer_field: str
    id_field: str | None = None
    config: str | None = None


# Column names were checked against each dataset card (dataset_info features) and published loaders.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("MATH500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id"),
    "aime24": BenchmarkSpec("AIME24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", "id"),
    "aime25": BenchmarkSpec("AIME25", "math-ai/aime25", "test", "problem", "answer", "id"),
    "amc23": BenchmarkSpec("AMC23", "math-ai/amc23", "test", "question", "answer", "id"),
    "minerva": BenchmarkSpec("Minerva", "math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": BenchmarkSpec("OlympiadBench", "math-ai/olympiadbench", "test", "question", "final_answer", "id"),
}

_ALIASES = {"math": "math500", "minervamath": "minerva", "olympiad": "olympiadbench", "amc": "amc23"}

TINY_BENCHMARK = "TinyMath"
TINY_BENCHMARK_FILE = Path(__file__).parent / "assets" / "tiny_math.jsonl"
# How long to wait for the Hub to answer before calling it unreachable; `datasets` itself retries for about 25 s.
HUB_PROBE_TIMEOUT = 10.0

# Fallback columns for local files, tried in order.
_PROBLEM_FIELDS = ("problem", "question", "prompt")
_ANSWER_FIELDS = ("answer", "final_answer", "gt", "solution")
_ID_FIELDS = ("id", "unique_id", "idx")


def _key(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return _ALIASES.get(key, key)


def benchmark_names() -> list[str]:
    """Display names of the built-in benchmarks, in the paper's order."""
    return [spec.name for spec in BENCHMARKS.values()]


def resolve_benchmark(name: str) -> BenchmarkSpec:
    """
    Look up a built-in benchmark by name, ignoring case and punctuation (`"MATH-500"`, `"math500"`).

    Args:
        name (`str`):
            Benchmark name.

    Returns:
        [`BenchmarkSpec`]: Its specification.

    Raises:
        `ValueError`: For an unknown name; the message lists the allowed names.
    """
    spec = BENCHMARKS.get(_key(name))
    if spec is None:
        raise ValueError(
            f"Unknown benchmark {name!r}. Choose from {', '.join(benchmark_names())}, {TINY_BENCHMARK} (a smoke test "
            "shipped with trl-eopd), or give a local file as NAME=path.jsonl."
        )
    return spec


@dataclass(frozen=True)
class BenchmarkSource:
    """
    A benchmark to evaluate: a built-in one, read from the Hub, or a local jsonl file under any name.

    Args:
        name (`str`):
            Name used in the results and summary.
        spec (`BenchmarkSpec` or `None`):
            The built-in specification, also used for a local file that takes a built-in name.
        path (`str` or `None`):
            Local jsonl file, when given as `NAME=path.jsonl`.
    """

    name: str
    spec: BenchmarkSpec | None = None
    path: str | None = None


def parse_benchmark_arg(value: str) -> BenchmarkSource:
    """
    Parse one `--benchmarks` entry: a built-in name, or `NAME=path.jsonl`.

    Args:
        value (`str`):
            The entry.

    Returns:
        [`BenchmarkSource`]: What to load.

    Raises:
        `ValueError`: For an unknown built-in name, or an empty name or path.
    """
    if "=" in value:
        name, path = (part.strip() for part in value.split("=", 1))
        if not name or not path:
            raise ValueError(f"Benchmark {value!r} must be NAME=path.jsonl.")
        spec = BENCHMARKS.get(_key(name))
        return BenchmarkSource(name=spec.name if spec else name, spec=spec, path=path)
    if _key(value) == _key(TINY_BENCHMARK):
        return BenchmarkSource(name=TINY_BENCHMARK, path=str(TINY_BENCHMARK_FILE))
    spec = resolve_benchmark(value)
    return BenchmarkSource(name=spec.name, spec=spec)


def _answer_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_answer_text(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        # AMC23 stores some answers as floats; "27.0" would still verify, but "27" reads as the answer it is.
        return str(int(value))
    # OlympiadBench wraps its answers in $...$; the grader strips a whole-answer pair, but not one per list item.
    return strip_math_delimiters(str(value))


def _pick(row: dict, preferred: str | None, fallbacks: tuple[str, ...]) -> str | None:
    for field in ((preferred,) if preferred else ()) + fallbacks:
        if field in row and row[field] is not None:
            return field
    return None


def _to_problems(rows, spec: BenchmarkSpec | None, origin: str) -> list[dict[str, str]]:
    problems, seen = [], set()
    for index, row in enumerate(rows):
        problem_field = _pick(row, spec.problem_field if spec else None, _PROBLEM_FIELDS)
        answer_field = _pick(row, spec.answer_field if spec else None, _ANSWER_FIELDS)
        if problem_field is None or answer_field is None:
            raise ValueError(
                f"{origin}: row {index} needs a problem column (one of {', '.join(_PROBLEM_FIELDS)}) and an answer "
                f"column (one of {', '.join(_ANSWER_FIELDS)}); it has {', '.join(sorted(row))}."
            )
        answer = row[answer_field]
        if answer_field == "solution":
            answer = last_boxed_content(str(answer)) or answer
        id_field = _pick(row, spec.id_field if spec else None, _ID_FIELDS)
        problem_id = str(row[id_field]) if id_field else str(index)
        if problem_id in seen:
            # Resume keys on the id, so ids must be unique; fall back to the row index.
            problem_id = f"{problem_id}#{index}"
        seen.add(problem_id)
        problems.append({"id": problem_id, "problem": str(row[problem_field]), "answer": _answer_text(answer)})
    return problems


def load_jsonl_problems(path: str | Path, spec: BenchmarkSpec | None = None) -> list[dict[str, str]]:
    """
    Read problems from a local jsonl file, one JSON object per line.

    Each object needs a problem (`problem`, `question` or `prompt`) and a reference answer (`answer`, `final_answer`,
    `gt`, or a `solution` whose last `\\boxed{}` is taken). An `id` (or `unique_id`, `idx`) is optional; the line
    index stands in for it.

    Args:
        path (`str` or `Path`):
            The file.
        spec (`BenchmarkSpec` or `None`, *optional*):
            A built-in benchmark whose column names are tried first.

    Returns:
        `list[dict[str, str]]`: Problems with keys `id`, `problem` and `answer`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Benchmark file {str(path)!r} does not exist.")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
    return _to_problems(rows, spec, str(path))


class BenchmarkUnavailableError(ConnectionError):
    """A built-in benchmark that cannot be downloaded now and is not in the local cache either."""


def load_benchmark(source: BenchmarkSource) -> list[dict[str, str]]:
    """
    Load the problems of a benchmark, from its local file or from the Hugging Face Hub.

    Args:
        source ([`BenchmarkSource`]):
            What to load.

    Returns:
        `list[dict[str, str]]`: Problems with keys `id`, `problem` and `answer`, in the dataset's order.

    Raises:
        [`BenchmarkUnavailableError`]: At once, when a Hub benchmark is not cached and the Hub is out of reach
        (`HF_HUB_OFFLINE=1`, or no answer); the message names the benchmark and how to give a local file instead.
    """
    if source.path is not None:
        return load_jsonl_problems(source.path, source.spec)
    from datasets import config as datasets_config
    from datasets import load_dataset
    from huggingface_hub import is_offline_mode

    spec = source.spec
    if is_offline_mode() or datasets_config.HF_HUB_OFFLINE:
        try:
            dataset = load_dataset(spec.hub_id, spec.config, split=spec.split)
        except ConnectionError as error:
            # What `datasets` raises offline when the cache has no copy; it has not tried the network.
            raise _unavailable(
                source, "is not in the local cache, and offline mode (HF_HUB_OFFLINE=1) keeps the Hub out of reach"
            ) from error
    else:
        unreachable = _hub_unreachable(spec.hub_id)
        if unreachable is not None and not _cached_on_disk(spec.hub_id):
            raise _unavailable(
                source,
                f"cannot be downloaded: the Hugging Face Hub did not answer ({unreachable})",
                offline_hint=True,
            ) from unreachable
        # Reachable, or cached: `datasets` downloads it, or falls back to its cached copy after its retries.
        dataset = load_dataset(spec.hub_id, spec.config, split=spec.split)
    return _to_problems(dataset, spec, spec.hub_id)


def _hub_unreachable(repo_id: str) -> Exception | None:
    """The error of one quick request for the dataset's card, or `None` when the Hub answered at all."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().dataset_info(repo_id, timeout=HUB_PROBE_TIMEOUT)
    except HfHubHTTPError:
        return None  # an answer (a gated or missing dataset): `datasets` reports it in its own words
    except Exception as error:  # the HTTP client's connection and timeout errors have no common public base
        return error
    return None


def _cached_on_disk(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "README.md", repo_type="dataset"), str)


def _unavailable(source: BenchmarkSource, reason: str, offline_hint: bool = False) -> BenchmarkUnavailableError:
    also = " To use a copy already in the cache, set HF_HUB_OFFLINE=1." if offline_hint else ""
    return BenchmarkUnavailableError(
        f"{source.name} ({source.spec.hub_id}) {reason}. Give a local copy instead as --benchmarks "
        f"{source.name}=path.jsonl (one JSON object per line, with `problem` and `answer`), or pass "
        f"--benchmarks {TINY_BENCHMARK} to check the pipeline with the problems shipped with trl-eopd.{also}"
    )
