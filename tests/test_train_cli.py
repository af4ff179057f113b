"""`trl-eopd train`: recipe resolution, argument checking and data conversion, plus one real single-process run.

Every bad-input test patches model loading to fail loudly, which proves the error is raised before any weights load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_eopd.cli import recipes as _recipes
from trl_eopd.cli.data import to_messages
from trl_eopd.cli.errors import UsageError
from trl_eopd.cli.script_arguments import EOPDScriptArguments
from trl_eopd.cli.tokenizer_setup import apply_chat_template_kwargs
from trl_eopd.cli.train import cli_main as main
from trl_eopd.cli.train import parse_args

RUN_WITH_ARTIFACTS = Path(__file__).resolve().parent / "run_with_artifacts.py"

PAPER_RECIPES = [
    f"qwen3-{size}-{variant}" for size in ("0.6b-math", "1.7b-math", "4b-dapo") for variant in ("eopd", "opd")
]


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    return tiny_assets[1]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make any attempt to load model weights fail the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input error was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def run_main_expecting_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- recipes and configs


def test_packaged_recipes_resolve_inside_the_package():
    names = _recipes.list_recipes()
    assert {"tiny-cpu", *PAPER_RECIPES} <= set(names)
    for name in names:
        path = _recipes.recipe_path(name)
        assert path.is_file() and path.parent == _recipes.RECIPES_DIR
    assert _recipes.recipe_path("tiny-cpu.yaml") == _recipes.recipe_path("tiny-cpu")
    assert set(_recipes.list_accelerate_configs()) >= {"zero2", "zero3", "zero3_offload", "multi_gpu"}
    assert _recipes.accelerate_config_path("zero3").name == "zero3.yaml"


def test_repo_root_recipes_is_the_packaged_folder():
    root = Path(__file__).resolve().parents[1] / "recipes"
    if not root.exists():
        pytest.skip("not a source checkout")
    assert root.resolve() == _recipes.RECIPES_DIR.resolve()


def test_misspelled_recipe_name_suggests_the_closest():
    with pytest.raises(FileNotFoundError, match="Did you mean 'tiny-cpu'"):
        _recipes.recipe_path("tiny-cup")


def test_missing_accelerate_config_is_reported():
    with pytest.raises(FileNotFoundError, match="zero3"):
        _recipes.accelerate_config_path("zero33")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        _recipes.accelerate_config_path("/no/such/accelerate.yaml")


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_parse_with_the_paper_settings(name):
    # bf16 needs a GPU at parse time; everything else is parsed as written.
    script_args, training_args, model_args = parse_args(["--config", name, "--bf16", "false"])
    assert training_args.teacher_model_name_or_path == "Qwen/Qwen3-8B"
    assert training_args.teacher_eos_token == "<|im_end|>"
    assert script_args.chat_template_kwargs == {"enable_thinking": False}
    assert training_args.learning_rate == 3e-6 and training_args.lr_scheduler_type.value == "cosine"
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 4 == 128
    assert training_args.max_new_tokens == 4096 and training_args.temperature == 1.0
    assert training_args.forward_kl_top_k == 16 and training_args.reverse_kl_estimator == "sampled"
    assert training_args.forward_kl_coef == 1.0
    expected = float("inf") if name.endswith("-opd") else 0.8
    assert training_args.entropy_threshold == expected
    assert model_args.model_name_or_path.startswith("Qwen/Qwen3-") and model_args.model_name_or_path.endswith("-Base")


def test_help_lists_the_packaged_recipes(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "trl-eopd train" in out and "tiny-cpu" in out and "--entropy_threshold" in out


# --------------------------------------------------------------------------------------------------- bad input


def test_unknown_recipe_key_is_named_with_a_suggestion(tmp_path, capsys, no_model_loading):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: tiny://student\nentropy_treshold: 0.5\nlerning_rate: 1.0e-5\n")
    err = run_main_expecting_error(["--config", str(recipe)], capsys)
    assert "'entropy_treshold' (did you mean 'entropy_threshold'?)" in err
    assert "'lerning_rate' (did you mean 'learning_rate'?)" in err


def test_unknown_command_line_flag_is_named_with_a_suggestion(capsys, no_model_loading):
    err = run_main_expecting_error(["--config", "tiny-cpu", "--forward_kl_topk", "8"], capsys)
    assert "'forward_kl_topk' (did you mean 'forward_kl_top_k'?)" in err


def test_unknown_recipe_name(capsys, no_model_loading):
    err = run_main_expecting_error(["--config", "qwen3-1.7b-math-eopdd"], capsys)
    assert "Did you mean 'qwen3-1.7b-math-eopd'" in err


def test_missing_dataset_column_is_named(tiny, tmp_path, capsys, no_model_loading):
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    argv = ["--config", "tiny-cpu", "--output_dir", str(tmp_path / "out"), "--dataset_name", str(data)]
    err = run_main_expecting_error(argv + ["--dataset_prompt_column", "problem"], capsys)
    assert "no column 'problem'" in err and "question, answer" in err
    err = run_main_expecting_error(argv, capsys)
    assert "neither a 'messages' column" in err and "question, answer" in err
    err = run_main_expecting_error(
        argv + ["--dataset_prompt_column", "question", "--dataset_completion_column", "answr"], capsys
    )
    assert "no column 'answr'" in err and "Did you mean 'answer'?" in err


def test_teacher_with_another_vocabulary_is_rejected_from_its_config(tiny, tmp_path, capsys, no_model_loading):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny["teacher"])
    config.vocab_size += 7
    config.save_pretrained(tmp_path / "teacher")  # a config alone: the check must not need weights
    err = run_main_expecting_error(
        [
            "--config",
            "tiny-cpu",
            "--output_dir",
            str(tmp_path / "o"),
            "--teacher_model_name_or_path",
            str(tmp_path / "teacher"),
        ],
        capsys,
    )
    assert f"vocabulary of {config.vocab_size} tokens" in err and f"has {config.vocab_size - 7}" in err


def test_missing_checkpoint_is_rejected(tiny, tmp_path, capsys, no_model_loading):
    err = run_main_expecting_error(
        [
            "--config",
            "tiny-cpu",
            "--output_dir",
            str(tmp_path / "o"),
            "--resume_from_checkpoint",
            str(tmp_path / "checkpoint-9"),
        ],
        capsys,
    )
    assert "checkpoint-9" in err and "does not exist" in err


def test_missing_model_path_is_reported_as_missing(tiny, tmp_path, capsys, no_model_loading):
    missing = str(tmp_path / "no-such-model")
    for flag in ("--model_name_or_path", "--teacher_model_name_or_path"):
        err = run_main_expecting_error(
            ["--config", "tiny-cpu", "--output_dir", str(tmp_path / "o"), flag, missing], capsys
        )
        assert f"model path {missing!r} does not exist" in err, err
        assert "Repo id" not in err


def test_empty_training_data_is_rejected(tiny, tmp_path, capsys, no_model_loading):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "completion": "2"}) + "\n")
    err = run_main_expecting_error(
        [
            "--config",
            "tiny-cpu",
            "--output_dir",
            str(tmp_path / "o"),
            "--dataset_name",
            str(data),
            "--max_train_samples",
            "0",
        ],
        capsys,
    )
    assert "has no rows to train on" in err, err


def test_prompt_only_data_requires_fully_on_policy(tiny, tmp_path, capsys, no_model_loading):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?"}) + "\n")
    err = run_main_expecting_error(
        [
            "--config",
            "tiny-cpu",
            "--output_dir",
            str(tmp_path / "o"),
            "--dataset_name",
            str(data),
            "--lmbda",
            "0.5",
            "--reverse_kl_estimator",
            "analytic",
        ],
        capsys,
    )
    assert "lmbda: 1.0" in err


def _one_error_line(err: str, *needles: str) -> str:
    """The single line of `err` (a progress bar of the data's formatting aside): `trl-eopd train: error: ...`."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("Formatting ")]
    assert len(lines) == 1 and lines[0].startswith("trl-eopd train: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--per_device_train_batch_size", "0"),
        ("--gradient_accumulation_steps", "0"),
        ("--max_new_tokens", "0"),
    ],
)
def test_sizes_below_one_fail_in_one_line_before_loading(tmp_path, capsys, no_model_loading, flag, value):
    err = run_main_expecting_error(["--config", "tiny-cpu", "--output_dir", str(tmp_path / "o"), flag, value], capsys)
    _one_error_line(err, f"`{flag[2:]}` must be an integer >= 1", f"got {value}")


@pytest.mark.parametrize(
    "name, text, where",
    [
        (
            "broken.jsonl",
            (
                '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                '{"messages": [oops\n'
            ),
            "line 2 is not valid JSON",
        ),
        ("broken.json", '[{"messages": 1},\n {"x": }]\n', "it is not valid JSON (Expecting value at line 2"),
    ],
)
def test_malformed_dataset_file_is_named_with_its_line(tiny, tmp_path, capsys, no_model_loading, name, text, where):
    data = tmp_path / name
    data.write_text(text)
    argv = ["--config", "tiny-cpu", "--output_dir", str(tmp_path / "o"), "--dataset_name", str(data)]
    _one_error_line(run_main_expecting_error(argv, capsys), f"cannot read dataset file {data}: {where}")


def test_a_prompt_longer_than_max_length_fails_before_loading(tiny, tmp_path, capsys, no_model_loading):
    rows = [
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]},
    ]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--config", "tiny-cpu", "--output_dir", str(tmp_path / "o"), "--dataset_name", str(data)]
    # Row 1's prompt alone is longer than 30 tokens (40 words, each a token at least), row 0's is not.
    line = _one_error_line(
        run_main_expecting_error(argv + ["--max_length", "30"], capsys),
        f"Row 1 of dataset {data}: its prompt has",
        "more than `max_length=30`",
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    prompt = tokenizer.apply_chat_template(rows[1]["messages"][:1], add_generation_prompt=True, tokenize=False)
    assert f"has {len(tokenizer(prompt, add_special_tokens=False)['input_ids'])} tokens" in line
    _one_error_line(run_main_expecting_error(argv + ["--max_length", "0"], capsys), "`max_length` must be None")


# --------------------------------------------------------------------------------------------------- data conversion


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_prompt_completion_columns_become_messages():
    args = EOPDScriptArguments(
        dataset_prompt_column="problem",
        dataset_completion_column="solution",
        prompt_template="{prompt}\nPut the answer in \\boxed{}.",
        system_prompt="Be brief.",
    )
    ds = to_messages(_dataset([{"problem": "1+1?", "solution": "2", "level": "1"}]), args, "d", lmbda=0.5)
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?\nPut the answer in \\boxed{}."},
        {"role": "assistant", "content": "2"},
    ]


def test_prompt_only_rows_get_an_empty_assistant_turn():
    # DAPO-style: a conversational prompt column and no completion.
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "solution": "4"}]
    ds = to_messages(_dataset(rows), EOPDScriptArguments(), "d", lmbda=1.0)
    assert ds[0]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": ""}]
    with pytest.raises(UsageError, match="lmbda: 1.0"):
        to_messages(_dataset(rows), EOPDScriptArguments(), "d", lmbda=0.5)


def test_messages_column_is_kept_and_extra_columns_dropped():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ds = to_messages(_dataset([{"messages": turns, "prompt": "stale"}]), EOPDScriptArguments(), "d", lmbda=1.0)
    assert ds.column_names == ["messages"] and ds[0]["messages"] == turns


def test_chat_template_kwargs_are_fixed_in_the_template(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    tokenizer.chat_template = (
        "{% if enable_thinking is defined and enable_thinking is false %}NO-THINK{% else %}THINK{% endif %}"
    )
    apply_chat_template_kwargs(tokenizer, {"enable_thinking": False})
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert rendered == "NO-THINK"


# --------------------------------------------------------------------------------------------------- real run


def test_tiny_cpu_recipe_trains_and_saves(tiny, tmp_path):
    """The README's smoke test, as a user runs it: a fresh process, the packaged recipe, no download."""
    out = tmp_path / "run"
    env = {**os.environ, "TRL_EOPD_TINY_DIR": os.environ["TRL_EOPD_TINY_DIR"], "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN_WITH_ARTIFACTS),
            "-m",
            "trl_eopd.cli.train",
            "--config",
            "tiny-cpu",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[trl-eopd] 1 process(es), device=cpu" in proc.stderr
    history = json.loads((out / "log_history_rank0.json").read_text())
    assert any("eopd/teacher_entropy" in entry for entry in history)
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()


def test_served_teacher_recipe_is_the_paper_recipe_with_the_teacher_on_a_server():
    _, served, _ = parse_args(["--config", "qwen3-1.7b-math-eopd-served", "--bf16", "false"])
    _, local, _ = parse_args(["--config", "qwen3-1.7b-math-eopd", "--bf16", "false"])
    assert served.teacher_model_server_url.startswith("http://")
    assert served.teacher_top_logprobs >= served.forward_kl_top_k == 16
    for name in (
        "entropy_threshold",
        "forward_kl_coef",
        "reverse_kl_estimator",
        "learning_rate",
        "max_new_tokens",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "temperature",
        "teacher_eos_token",
    ):
        assert getattr(served, name) == getattr(local, name), name


def test_the_teacher_id_column_is_kept_for_routing_to_several_teachers():
    rows = [{"problem": "1+1?", "teacher_id": "math", "level": "1"}, {"problem": "f()?", "teacher_id": "code",
                                                                       "level": "2"}]  # fmt: skip
    ds = to_messages(_dataset(rows), EOPDScriptArguments(dataset_prompt_column="problem"), "d", lmbda=1.0)
    assert sorted(ds.column_names) == ["messages", "teacher_id"] and ds["teacher_id"] == ["math", "code"]


def test_the_two_teacher_recipe_is_the_served_recipe_with_a_mapping_of_teachers():
    _, routed, _ = parse_args(["--config", "qwen3-1.7b-mopd-math-code-served", "--bf16", "false"])
    _, served, _ = parse_args(["--config", "qwen3-1.7b-math-eopd-served", "--bf16", "false"])
    assert sorted(routed.teacher_model_server_url) == ["code", "math"]
    assert set(routed.teacher_entropy_thresholds) <= set(routed.teacher_model_server_url)
    for name in ("entropy_threshold", "forward_kl_coef", "forward_kl_top_k", "reverse_kl_estimator", "learning_rate",
                 "teacher_top_logprobs", "temperature", "teacher_eos_token"):  # fmt: skip
        assert getattr(routed, name) == getattr(served, name), name
