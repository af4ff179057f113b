"""Tests of `trl-eopd eval`: pass@k, grading, benchmark loading, the end-to-end run with resume, and --compare."""

import fnmatch
import itertools
import json
import math
import runpy
import socket
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from trl_eopd.evaluation import benchmarks as bm
from trl_eopd.evaluation.cli import main
from trl_eopd.evaluation.generation import (
    DEFAULT_PROMPT_TEMPLATE,
    Completion,
    SamplingSettings,
    TransformersGenerator,
    cut_at_stop,
    prompt_template_hash,
    render_prompt,
    stop_token_ids,
)
from trl_eopd.evaluation.grading import MathVerifyGrader, last_boxed_content
from trl_eopd.evaluation.passk import mean_accuracy, mean_pass_at_k, pass_at_k
from trl_eopd.evaluation.runner import (
    EvalConfig,
    EvaluationError,
    ProtocolMismatchError,
    compare_runs,
    format_comparison,
    run_evaluation,
)

FIXTURE = Path(__file__).parent / "fixtures" / "eval" / "toy_math.jsonl"


# --------------------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (8, 0, 8, 0.0),
        (8, 1, 8, 1.0),  # n - c < k: every 8-subset of 8 holds the correct sample
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (8, 7, 1, 7 / 8),
        (8, 2, 4, 1 - 15 / 70),  # 1 - C(6,4)/C(8,4)
        (3, 3, 3, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_enumeration_of_all_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 100) overflows a float; the product form must still match the exact rational value.
    n, c, k = 2000, 10, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert 0.0 <= pass_at_k(5000, 1, 1) <= 1.0


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 2)


def test_means():
    counts = [(4, 1), (4, 4), (4, 0)]
    assert mean_accuracy(counts) == pytest.approx((0.25 + 1 + 0) / 3)
    assert mean_pass_at_k(counts, 2) == pytest.approx((0.5 + 1 + 0) / 3)
    assert math.isnan(mean_accuracy([]))


# -------------------------------------------------------------------------------------------------------- grading


@pytest.fixture(scope="module")
def grader():
    return MathVerifyGrader()


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("So the answer is \\boxed{0.5}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("Hence \\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
        ("\\boxed{x=3}", "3"),
        ("\\boxed{3}", "x=3"),
        ("\\boxed{3}", "$3$"),
        ("We get \\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
        ("\\boxed{90^\\circ}", "90"),
        ("First \\boxed{7}. Wait, that is wrong: \\boxed{12}", "12"),
        ("The final answer is 12.", "12"),  # no box: math-verify's anchored extraction
        ("\\boxed{(1, 2)}", "(1,2)"),
    ],
)
def test_grader_accepts_equivalent_answers(grader, completion, answer):
    assert grader.grade(completion, answer).correct


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{4}", "3"),
        ("\\boxed{0.25}", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{2}}", "2\\sqrt{2}"),
        ("First \\boxed{12}. Wait, that is wrong: \\boxed{7}", "12"),  # the last box is the answer
        ("I do not know.", "5"),
        ("", "5"),
        ("\\boxed{}", "3"),
        ("\\boxed{3", "3"),  # truncated, never closed
    ],
)
def test_grader_rejects_non_equivalent_answers(grader, completion, answer):
    assert not grader.grade(completion, answer).correct


# math-verify can pick the boxed answer itself (`parse` on the whole completion with `LatexExtractionConfig`, whose
# boxed match keeps the last box), but it treats boxes that are close together, or separated by a comma, a semicolon,
# "and" or "or", as one multi-part answer, and it does not read `\fbox`. The grader keeps its own last-box rule: the
# prompt asks for one final answer in a box, a model that corrects itself ("..., wait: \boxed{12}") must be graded on
# the correction (a fixture above), and a hedge of two boxed answers must not be read as the set of both.
_WHERE_MATH_VERIFY_ALONE_DIFFERS = [
    # (completion, reference, our verdict)
    ("First \\boxed{7}. Wait, that is wrong: \\boxed{12}", "12", True),
    ("\\boxed{7} \\boxed{12}", "12", True),
    ("\\boxed{12}, or \\boxed{7}", "7", True),
    ("so \\boxed{3} is wrong; the answer is \\boxed{4}", "4", True),
    ("\\boxed{2} and \\boxed{3}", "\\{2,3\\}", False),  # two boxes are not one set-valued answer
    ("\\fbox{4}", "4", True),
]


@pytest.mark.parametrize("completion, answer, correct", _WHERE_MATH_VERIFY_ALONE_DIFFERS)
def test_grader_reads_only_the_last_box(grader, completion, answer, correct):
    assert grader.grade(completion, answer).correct is correct


@pytest.mark.parametrize("completion, answer, correct", _WHERE_MATH_VERIFY_ALONE_DIFFERS)
def test_math_verify_alone_still_grades_these_differently(grader, completion, answer, correct):
    import math_verify

    config = [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]
    prediction = math_verify.parse(completion, extraction_config=config)
    alone = bool(prediction) and bool(math_verify.verify(grader.parse_reference(answer), prediction))
    assert alone is not correct, (
        f"math-verify's own extraction now grades {completion!r} like the grader's last-box rule; if it does so for "
        "every case here, MathVerifyGrader can drop last_boxed_content and let math-verify pick the answer."
    )


def test_last_boxed_content_matches_nested_braces():
    assert last_boxed_content("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed_content("\\boxed{1} then \\fbox{2}") == "2"
    assert last_boxed_content("\\boxed{1} then \\boxed{2") == "1"
    assert last_boxed_content("no box") is None


# ----------------------------------------------------------------------------------------------------- benchmarks


def test_registry_has_the_papers_six_benchmarks():
    assert bm.benchmark_names() == ["MATH500", "AIME24", "AIME25", "AMC23", "Minerva", "OlympiadBench"]
    assert bm.resolve_benchmark("math-500").hub_id == "HuggingFaceH4/MATH-500"
    assert bm.resolve_benchmark("Minerva_Math").name == "Minerva"
    assert bm.resolve_benchmark("OLYMPIADBENCH").answer_field == "final_answer"


def test_unknown_benchmark_lists_allowed_names():
    with pytest.raises(ValueError, match="Unknown benchmark 'gsm8k'.*MATH500, AIME24, AIME25, AMC23, Minerva"):
        bm.resolve_benchmark("gsm8k")


def test_local_jsonl_columns(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"question": "q1", "final_answer": ["$\\frac{1}{2}$", "$3$"]},
        {"problem": "q2", "answer": 27.0, "id": 5},
        {"problem": "q3", "solution": "so \\boxed{\\frac{3}{4}}", "id": 5},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    source = bm.parse_benchmark_arg(f"mine={path}")
    assert source.name == "mine" and source.spec is None
    problems = bm.load_benchmark(source)
    assert [p["answer"] for p in problems] == ["\\frac{1}{2}, 3", "27", "\\frac{3}{4}"]
    assert [p["id"] for p in problems] == ["0", "5", "5#2"]  # a duplicate id gets the row index
    # A local copy of a built-in benchmark keeps the built-in's display name.
    assert bm.parse_benchmark_arg(f"math500={FIXTURE}").name == "MATH500"
    with pytest.raises(FileNotFoundError):
        bm.load_benchmark(bm.parse_benchmark_arg(f"x={tmp_path / 'missing.jsonl'}"))


def test_hub_failure_points_to_local_files(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit):
        main(["--model", tiny_model_dir, "--benchmarks", "aime25", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "math-ai/aime25" in err and "AIME25=path.jsonl" in err


def test_shipped_tiny_benchmark_is_gradable_and_packaged():
    source = bm.parse_benchmark_arg("tiny-math")
    assert (source.name, Path(source.path)) == (bm.TINY_BENCHMARK, bm.TINY_BENCHMARK_FILE)
    problems = bm.load_benchmark(source)
    assert len(problems) >= 5 and len({p["id"] for p in problems}) == len(problems)
    grader = MathVerifyGrader()
    for problem in problems:
        answer = problem["answer"]
        assert grader.grade(f"so the answer is \\boxed{{{answer}}}", answer).correct, problem
        assert not grader.grade("so the answer is \\boxed{7}", answer).correct, problem
    # The wheel carries it: a package-data pattern of pyproject.toml matches its path.
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["trl_eopd"]
    relative = bm.TINY_BENCHMARK_FILE.relative_to(root / "trl_eopd").as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), (relative, patterns)


@pytest.fixture
def unpublished_aime25(monkeypatch, tmp_path):
    """AIME25 pointed at a Hub id nobody has cached (a developer's cache may hold the real one), in an empty cache."""
    from dataclasses import replace

    from huggingface_hub import constants

    monkeypatch.setitem(bm.BENCHMARKS, "aime25", replace(bm.BENCHMARKS["aime25"], hub_id="trl-eopd-tests/unpublished"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return bm.BENCHMARKS["aime25"]


@pytest.fixture
def no_model_loading(monkeypatch):
    from transformers import AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the benchmarks")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


def _failing_eval(tiny_model_dir, tmp_path, capsys) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", tiny_model_dir, "--benchmarks", "aime25", "--output-dir", str(tmp_path / "out")])
    elapsed = time.monotonic() - start
    assert exit_info.value.code == 2
    return capsys.readouterr().err, elapsed


def test_offline_hub_benchmark_fails_at_once_naming_it(
    tiny_model_dir, tmp_path, monkeypatch, capsys, unpublished_aime25, no_model_loading
):
    from datasets import config as datasets_config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    err, elapsed = _failing_eval(tiny_model_dir, tmp_path, capsys)
    assert "AIME25 (trl-eopd-tests/unpublished) is not in the local cache" in err and "HF_HUB_OFFLINE=1" in err
    assert "--benchmarks AIME25=path.jsonl" in err and "TinyMath" in err
    # Online, `datasets` retries the Hub for about 25 s before it gives up; offline it must not wait at all.
    assert elapsed < 15, elapsed


def test_unreachable_hub_fails_at_once_without_datasets_retries(
    tiny_model_dir, tmp_path, monkeypatch, capsys, unpublished_aime25, no_model_loading
):
    import datasets
    from datasets import config as datasets_config
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)

    def retrying(*args, **kwargs):
        raise AssertionError("datasets was asked, and retries an unreachable Hub for about 25 s")

    monkeypatch.setattr(datasets, "load_dataset", retrying)
    err, elapsed = _failing_eval(tiny_model_dir, tmp_path, capsys)
    assert "AIME25 (trl-eopd-tests/unpublished) cannot be downloaded: the Hugging Face Hub did not answer" in err
    assert "--benchmarks AIME25=path.jsonl" in err and "set HF_HUB_OFFLINE=1" in err
    assert elapsed < 15, elapsed


def test_unreachable_hub_still_serves_a_cached_copy(monkeypatch, unpublished_aime25):
    import datasets
    from datasets import config as datasets_config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(bm, "_hub_unreachable", lambda repo_id: ConnectionError("no network"))
    # The Hub cache's layout for a dataset whose card was downloaded once.
    repo = Path(constants.HF_HUB_CACHE) / "datasets--trl-eopd-tests--unpublished"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "README.md").write_text("card")
    asked = []

    def cached(hub_id, config, split):
        asked.append(hub_id)
        return [{"problem": "What is 1 + 1?", "answer": "2", "id": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", cached)
    problems = bm.load_benchmark(bm.parse_benchmark_arg("aime25"))
    assert asked == ["trl-eopd-tests/unpublished"]
    assert problems == [{"id": "a", "problem": "What is 1 + 1?", "answer": "2"}]


# ---------------------------------------------------------------------------------------------------- prompting


def test_prompt_rendering(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Braces in the problem must survive: substitution is literal, not str.format.
    text, chat = render_prompt(tokenizer, "Find {x} if $x^{2}=4$.", use_chat_template=False)
    assert not chat
    assert text == DEFAULT_PROMPT_TEMPLATE.replace("{problem}", "Find {x} if $x^{2}=4$.")
    assert "\\boxed{}" in text
    text, chat = render_prompt(tokenizer, "What is 1+1?")
    assert chat and text.startswith("<|im_start|>user\nWhat is 1+1?") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, chat=True)
    assert stop_token_ids(tokenizer, chat=False) == [tokenizer.eos_token_id]
    hashes = {
        prompt_template_hash(DEFAULT_PROMPT_TEMPLATE),
        prompt_template_hash(DEFAULT_PROMPT_TEMPLATE, chat_template=True),
        prompt_template_hash(DEFAULT_PROMPT_TEMPLATE, True, {"enable_thinking": False}),
        prompt_template_hash("Q: {problem}"),
    }
    assert len(hashes) == 4


def test_cut_at_stop_keeps_the_first_stop_token():
    assert cut_at_stop([5, 6, 2, 7, 2, 0], {2, 3}) == ([5, 6, 2], True)
    assert cut_at_stop([5, 3, 6, 2], {2, 3}) == ([5, 3], True)
    assert cut_at_stop([5, 6, 7], {2}) == ([5, 6, 7], False)  # ran out of budget: every token kept
    assert cut_at_stop([], {2}) == ([], False)


def test_generator_on_a_loaded_model_matches_its_token_ids(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stop = stop_token_ids(tokenizer, chat=True)
    sampling = SamplingSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3)
    prompts = [tokenizer("What is 1+1?")["input_ids"], tokenizer("Say 2.")["input_ids"]]
    token_ids = TransformersGenerator(model, tokenizer, sampling, stop).sample(prompts)
    completions = TransformersGenerator(model, tokenizer, sampling, stop).generate(prompts)
    assert [len(row) for row in token_ids] == [len(row) for row in completions] == [3, 3]
    for ids_row, completion_row in zip(token_ids, completions):
        for ids, completion in zip(ids_row, completion_row):
            finished = bool(ids) and ids[-1] in stop
            assert completion.num_tokens == len(ids) and completion.finished == finished
            assert finished or len(ids) == 6
            assert not any(token in stop for token in ids[:-1])
            kept = ids[:-1] if finished else ids
            assert completion.text == tokenizer.decode(kept, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ CLI validation


def test_cli_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--benchmarks", "MATH500,gsm8k", "--output-dir", "unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown benchmark 'gsm8k'" in err and "OlympiadBench" in err


def test_cli_k_larger_than_n(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--n", "4", "--k", "8", "--output-dir", "unused"])
    assert exit_info.value.code == 2
    assert "k=8 > n=4" in capsys.readouterr().err


def test_cli_requires_model(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "--model is required" in capsys.readouterr().err


def _cli_config(argv):
    from trl_eopd.evaluation.cli import build_parser

    parser = build_parser()
    (config,) = parser.parse_dict(vars(parser.parse_args(argv)), allow_extra_keys=True)
    return config


def test_cli_options_fill_eval_config(tmp_path):
    checkpoint = tmp_path / "org" / "Some Model"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")  # a local path must be a checkpoint folder
    config = _cli_config(["--model", f"{checkpoint}/"])
    assert config.benchmarks == bm.benchmark_names()
    assert config.output_dir == "eval_results/Some_Model"
    assert (config.n, config.k, config.temperature, config.top_p, config.max_new_tokens) == (8, 8, 1.0, 0.8, 8192)
    assert config.use_chat_template is True and config.chat_template_kwargs is None
    assert (config.backend, config.dtype, config.seed) == ("auto", "auto", 0)
    assert config.limit is None and config.batch_size is None

    config = _cli_config(
        [
            "--model",
            "m",
            "--benchmarks",
            "math500,AIME24",
            "amc23",
            "--top-p",
            "0.95",
            "--max-new-tokens",
            "16",
            "--batch-size",
            "4",
            "--no-chat-template",
            "--chat-template-kwargs",
            '{"enable_thinking": false}',
            "--output-dir",
            "out",
            "--n",
            "4",
            "--k",
            "2",
            "--backend",
            "transformers",
            "--dtype",
            "float32",
        ]
    )
    assert [source.name for source in config.sources] == ["MATH500", "AIME24", "AMC23"]
    assert (config.top_p, config.max_new_tokens, config.batch_size, config.n, config.k) == (0.95, 16, 4, 4, 2)
    assert config.use_chat_template is False and config.chat_template_kwargs == {"enable_thinking": False}
    assert (config.output_dir, config.backend, config.dtype) == ("out", "transformers", "float32")


@pytest.mark.parametrize(
    "value, message",
    [("[1]", "expected a JSON object"), ("{bad", "not valid JSON")],
)
def test_cli_rejects_bad_chat_template_kwargs(capsys, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--chat-template-kwargs", value])
    assert exit_info.value.code == 2
    assert f"argument --chat-template-kwargs: {message}" in capsys.readouterr().err


def test_module_entry_point_help(monkeypatch, capsys):
    # In-process `python -m trl_eopd.evaluation --help`: a subprocess would pay the package's import time again.
    monkeypatch.setattr(sys, "argv", ["python -m trl_eopd.evaluation", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("trl_eopd.evaluation", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--compare" in out and "--max-new-tokens" in out


# --------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from trl_eopd.tiny import build_tiny_model, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_eval_model")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def count_generations(monkeypatch):
    """Counts prompts sent to the transformers backend and how often the model is loaded."""
    counts = {"prompts": 0, "loads": 0}
    original_generate, original_init = TransformersGenerator.generate, TransformersGenerator.__init__

    def generate(self, prompt_ids):
        counts["prompts"] += len(prompt_ids)
        return original_generate(self, prompt_ids)

    def init(self, *args, **kwargs):
        counts["loads"] += 1
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(TransformersGenerator, "generate", generate)
    monkeypatch.setattr(TransformersGenerator, "__init__", init)
    return counts


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_end_to_end_with_resume(tiny_model_dir, tmp_path, count_generations, capsys):
    out = tmp_path / "run"
    base = [
        "--model",
        tiny_model_dir,
        "--benchmarks",
        f"toy={FIXTURE}",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--backend",
        "transformers",
        "--output-dir",
        str(out),
        "--seed",
        "1",
    ]

    assert main(base + ["--limit", "2"]) == 0
    assert count_generations == {"prompts": 2, "loads": 1}
    records = _read_jsonl(out / "results.jsonl")
    assert [r["id"] for r in records] == ["add-1", "frac-1"]
    for record in records:
        assert record["benchmark"] == "toy" and record["n"] == 2
        assert len(record["completions"]) == len(record["correct"]) == 2
        assert record["c"] == sum(record["correct"])
        assert set(record) >= {"problem", "answer", "completions", "correct", "n", "c"}
        assert all(0 < t <= 8 for t in record["num_tokens"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["toy"]["num_problems"] == 2
    protocol = summary["protocol"]
    assert {k: protocol[k] for k in ("n", "k", "temperature", "top_p", "max_new_tokens")} == {
        "n": 2,
        "k": 2,
        "temperature": 1.0,
        "top_p": 0.8,
        "max_new_tokens": 8,
    }
    assert len(protocol["prompt_template_hash"]) == 16
    assert protocol["chat_template"] is True
    assert "| toy |" in (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert "| Benchmark | Avg@2 | Pass@2 |" in printed

    # Resume: only the third problem is sampled.
    assert main(base + ["--limit", "3"]) == 0
    assert count_generations == {"prompts": 3, "loads": 2}
    records = _read_jsonl(out / "results.jsonl")
    assert [r["id"] for r in records] == ["add-1", "frac-1", "root-1"]
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["toy"]["num_problems"] == 3

    # Nothing left to do: the model is not even loaded. A different k only changes the summary.
    assert main(base + ["--k", "1"]) == 0
    assert count_generations == {"prompts": 3, "loads": 2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["k"] == 1
    assert summary["benchmarks"]["toy"]["pass_at_k"] == pytest.approx(summary["benchmarks"]["toy"]["avg_at_n"])

    # A record torn by an interruption is dropped and that problem sampled again.
    text = (out / "results.jsonl").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    (out / "results.jsonl").write_text(text[: len(text) - len(last) - 1] + last[:20])
    assert main(base) == 0
    assert count_generations["prompts"] == 4
    assert [r["id"] for r in _read_jsonl(out / "results.jsonl")] == ["add-1", "frac-1", "root-1"]

    # Samples drawn under other settings are not mixed in.
    with pytest.raises(SystemExit):
        main(base + ["--temperature", "0.6"])
    assert "temperature (1.0 vs 0.6)" in capsys.readouterr().err


class _StubGenerator:
    """Returns fixed completions, so that grades and metrics are known in advance."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompt_ids):
        return [[Completion(text=t, num_tokens=len(t), finished=True) for t in self.texts] for _ in prompt_ids]


def _stub_run(model_dir, out, texts, **kwargs):
    config = EvalConfig(model=model_dir, benchmarks=[f"toy={FIXTURE}"], output_dir=str(out), n=len(texts), **kwargs)
    return run_evaluation(config, generator=_StubGenerator(texts), progress=False)


def test_metrics_from_known_grades(tiny_model_dir, tmp_path):
    # Fixture answers: 4, \frac{1}{2}, 2\sqrt{2}. Each problem gets the same two completions.
    summary = _stub_run(tiny_model_dir, tmp_path / "a", ["... \\boxed{4}", "so \\boxed{0.5}"])
    row = summary["benchmarks"]["toy"]
    assert [r["c"] for r in _read_jsonl(tmp_path / "a" / "results.jsonl")] == [1, 1, 0]
    assert row["avg_at_n"] == pytest.approx(100 * (0.5 + 0.5 + 0) / 3)
    assert row["pass_at_k"] == pytest.approx(100 * 2 / 3)
    assert summary["average"]["avg_at_n"] == pytest.approx(row["avg_at_n"])


def test_compare(tiny_model_dir, tmp_path, capsys):
    _stub_run(tiny_model_dir, tmp_path / "a", ["\\boxed{4}", "\\boxed{0.5}"])
    _stub_run(tiny_model_dir, tmp_path / "b", ["\\boxed{4}", "\\boxed{4}"])
    comparison = compare_runs(tmp_path / "a", tmp_path / "b" / "summary.json")
    (row,) = comparison["rows"]
    assert row["avg_at_n"]["delta"] == pytest.approx(100 / 3 - 100 / 3)
    assert row["pass_at_k"]["delta"] == pytest.approx(100 / 3 - 200 / 3)
    assert "-33.33" in format_comparison(comparison)

    assert main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "Δ Pass@2" in printed and "| toy | 33.33 | 33.33 | +0.00 | 66.67 | 33.33 | -33.33 |" in printed


def test_compare_protocol_mismatch(tiny_model_dir, tmp_path, capsys):
    _stub_run(tiny_model_dir, tmp_path / "a", ["\\boxed{4}", "\\boxed{0.5}"])
    _stub_run(tiny_model_dir, tmp_path / "b", ["\\boxed{4}", "\\boxed{0.5}"], temperature=0.6, top_p=1.0)
    with pytest.raises(ProtocolMismatchError, match=r"temperature \(1.0 vs 0.6\); top_p \(0.8 vs 1.0\)"):
        compare_runs(tmp_path / "a", tmp_path / "b")

    _stub_run(tiny_model_dir, tmp_path / "c", ["\\boxed{4}"] * 3, prompt_template="Q: {problem}\nA:")
    with pytest.raises(SystemExit) as exit_info:
        main(["--compare", str(tmp_path / "a"), str(tmp_path / "c")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "n (2 vs 3)" in err and "k (2 vs 3)" in err and "prompt (template hash)" in err

    with pytest.raises(EvaluationError, match="No evaluation summary"):
        compare_runs(tmp_path / "a", tmp_path / "missing")


def test_tiny_model_defaults_to_the_shipped_benchmark(tiny_assets, tmp_path):
    out = tmp_path / "tiny-default"
    argv = ["--model", "tiny://student", "--n", "1", "--max-new-tokens", "4", "--limit", "2",
            "--backend", "transformers", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    shipped = bm.load_jsonl_problems(bm.TINY_BENCHMARK_FILE)
    records = _read_jsonl(out / "results.jsonl")
    assert [(r["benchmark"], r["id"], r["answer"]) for r in records] == [
        (bm.TINY_BENCHMARK, p["id"], p["answer"]) for p in shipped[:2]
    ]
    assert list(json.loads((out / "summary.json").read_text())["benchmarks"]) == [bm.TINY_BENCHMARK]


def test_tiny_names_work_as_in_train(tiny_assets, tmp_path, capsys):
    # `trl-eopd train` advertises `tiny://student`; eval takes the same names instead of failing on a hub lookup.
    out = tmp_path / "tiny"
    argv = [
        "--model",
        "tiny://student",
        "--benchmarks",
        f"toy={FIXTURE}",
        "--n",
        "1",
        "--max-new-tokens",
        "4",
        "--limit",
        "1",
        "--backend",
        "transformers",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    assert len(_read_jsonl(out / "results.jsonl")) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny://nothing", "--benchmarks", f"toy={FIXTURE}"])
    assert exit_info.value.code == 2
    assert "tiny://student" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- errors in one line, before work


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail the test if a benchmark is downloaded or a tokenizer or model loaded."""
    import datasets
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a benchmark, tokenizer or model was loaded before the input error was reported")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _one_eval_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trl-eopd eval: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


@pytest.mark.parametrize("extra", [[], ["--benchmarks", "TinyMath"]])
def test_cli_missing_model_path_is_named_before_any_download(tmp_path, capsys, nothing_loaded, extra):
    line = _one_eval_error(["--model", "./no-such-model", *extra, "--output-dir", str(tmp_path / "o")], capsys)
    assert "--model './no-such-model' does not exist" in line and "Hub" not in line.split("does not exist")[0]
    line = _one_eval_error(["--model", "tiny://student", "--tokenizer", str(tmp_path / "nope"), *extra], capsys)
    assert f"--tokenizer {str(tmp_path / 'nope')!r} does not exist" in line


def test_cli_folder_that_is_not_a_checkpoint_is_named(tmp_path, capsys, nothing_loaded):
    line = _one_eval_error(["--model", str(tmp_path), "--benchmarks", "TinyMath"], capsys)
    assert f"--model {str(tmp_path)!r} is a folder but not a checkpoint" in line and "config.json" in line


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--nn", "4"], "--nn: did you mean --n?"),
        (["--max-new", "4"], "--max-new: did you mean --max-new-tokens?"),  # an abbreviation, refused
        (["--top_pp", "0.9"], "--top_pp: did you mean --top_p?"),
    ],
)
def test_cli_unknown_flag_is_one_line_with_the_closest_option(capsys, nothing_loaded, argv, hint):
    line = _one_eval_error(["--model", "tiny://student", *argv], capsys)
    assert "unrecognized arguments" in line and hint in line and "`trl-eopd eval --help`" in line


def test_cli_run_errors_are_one_line_too(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--model",
        tiny_model_dir,
        "--benchmarks",
        f"toy={FIXTURE}",
        "--n",
        "1",
        "--max-new-tokens",
        "2",
        "--limit",
        "1",
        "--backend",
        "transformers",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    line = _one_eval_error([*argv[:-2], "--max-new-tokens", "3", "--output-dir", str(out)], capsys)
    assert f"{out} holds results sampled with different settings: max_new_tokens (2 vs 3)" in line


def test_docs_smoke_runs_work_as_written_in_order(tiny_assets, tmp_path, monkeypatch, capsys):
    """docs/evaluation.md's download-free commands, one after the other, from a fresh folder, as a reader runs them."""
    import shlex

    page = (Path(__file__).resolve().parent.parent / "docs" / "evaluation.md").read_text()
    block = page.split("## A smoke run without a download", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) >= 2 and all(command[:2] == ["trl-eopd", "eval"] for command in commands)
    monkeypatch.chdir(tmp_path)
    relative = FIXTURE.relative_to(Path(__file__).resolve().parent.parent)
    (tmp_path / relative).parent.mkdir(parents=True)
    (tmp_path / relative).write_bytes(FIXTURE.read_bytes())
    written = []
    for command in commands:
        assert main(command[2:]) == 0, command
        written.append(capsys.readouterr().out.strip().splitlines()[-1])
    # Each run has a folder of its own: nothing refused, nothing overwritten.
    folders = [line.split("Results in ", 1)[1].split(" (", 1)[0] for line in written]
    assert len(set(folders)) == len(commands), folders
    for folder in folders:
        assert (tmp_path / folder / "summary.json").is_file()
