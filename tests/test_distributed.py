"""Real multi-process runs of the shipped accelerate configs, on CPU, with the tiny local models.

Each run is `accelerate launch --config_file <packaged zero2.yaml / zero3.yaml> --num_processes 2
--mixed_precision no scripts/eopd.py --config tiny-cpu ...`: the configs are used as shipped, only the process count
and precision are overridden. (accelerate's `--cpu` flag is not passed: it selects accelerate's single-process
launcher and turns DeepSpeed off. Without GPUs, DeepSpeed falls back to its CPU accelerator by itself, and
`trl-eopd train` picks the gloo process group for it.)

The runs are module-scoped fixtures shared by the checks; together they take about three minutes on two cores. The
first DeepSpeed launch on a machine also compiles DeepSpeed's shared-memory CPU communication op (a few minutes,
cached under ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_eopd.cli.recipes import accelerate_config_path

pytestmark = pytest.mark.slow

pytest.importorskip("deepspeed")

STEPS = 2
# The shipped `scripts/eopd.py`, run by a test-side wrapper whose callback writes each rank's log history and probe
# logits for the checks below (tests/_artifacts.py).
RUN_WITH_ARTIFACTS = Path(__file__).resolve().parent / "run_with_artifacts.py"
EOPD_KEYS = ("eopd/teacher_entropy", "eopd/student_entropy", "eopd/high_entropy_ratio", "eopd/reverse_kl")


@pytest.fixture(scope="module")
def tiny_env(tiny_assets):
    root, paths = tiny_assets
    env = {
        **os.environ,
        "TRL_EOPD_TINY_DIR": str(root),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        # Each run picks its own rendezvous port, so two runs never collide.
        "MASTER_PORT": "0",
        # As docs/scaling.md gives the CPU launch: DeepSpeed's own switch, so that `accelerate launch` (which imports
        # DeepSpeed before any EOPD code runs) does not log that it fell back to the CPU.
        "DS_ACCELERATOR": "cpu",
    }
    return env, paths


def launch(env, accelerate_config: str, output_dir: Path, *extra: str, timeout: int = 420) -> str:
    """`accelerate launch` on `scripts/eopd.py` as the docs give it for a CPU machine (`--mixed_precision no`: the
    packaged configs ask for bf16, for GPUs)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_path(accelerate_config)),
        "--mixed_precision", "no",
        "--num_processes", "2",
        "--main_process_port", str(_free_port()),
        str(RUN_WITH_ARTIFACTS),
        "--config", "tiny-cpu",
        "--output_dir", str(output_dir),
        "--max_steps", str(STEPS),
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{log[-6000:]}"
    return log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def histories(output_dir: Path) -> list[list[dict]]:
    return [json.loads((output_dir / f"log_history_rank{r}.json").read_text()) for r in range(2)]


def assert_ranks_logged(log: str) -> None:
    # Only rank 0 speaks; that rank 1 trained too shows in its own log history (`assert_metrics_gathered`).
    assert log.count("[trl-eopd] 2 process(es), device=cpu, distributed_type=DEEPSPEED") == 1
    assert log.count("[trl-eopd] saved the student") == 1
    assert "Traceback" not in log


def assert_metrics_gathered(output_dir: Path, steps: int = STEPS) -> None:
    h0, h1 = histories(output_dir)
    train0 = [e for e in h0 if "loss" in e]
    train1 = [e for e in h1 if "loss" in e]
    assert [e["step"] for e in train0] == list(range(1, steps + 1))
    for a, b in zip(train0, train1, strict=True):
        for key in EOPD_KEYS:
            assert key in a, f"{key} not logged: {sorted(a)}"
            # Gathered across processes before logging, so both ranks log the same number.
            assert a[key] == b[key], (key, a[key], b[key])
        assert a["loss"] == b["loss"]


def assert_reload_matches(output_dir: Path, *, base: str | None = None) -> None:
    from transformers import AutoModelForCausalLM

    probe = torch.load(output_dir / "probe_logits.pt")
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), output_dir)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def zero2_run(tiny_env, tmp_path_factory):
    env, _ = tiny_env
    out = tmp_path_factory.mktemp("zero2") / "out"
    return out, launch(env, "zero2", out)


ZERO3_ARGS = ("--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1")
FALLBACK_WARNING = "falls back to the exact full-logits path"


@pytest.fixture(scope="module")
def zero3_run(tiny_env, tmp_path_factory):
    env, _ = tiny_env
    out = tmp_path_factory.mktemp("zero3") / "out"
    return out, launch(env, "zero3", out, *ZERO3_ARGS)


# Messages a CPU ZeRO-3 run printed before they were fixed at their cause or silenced where they arise
# (trl_eopd/cli/quiet.py says where each is fixed); a new warning of any kind also fails the test, so that it gets
# looked at.
NOISE = (
    "Warning",
    "warnings.warn",
    "Setting accelerator to CPU",
    "Gradient accumulation steps mismatch",
    "generation-related arguments",
    "built successfully",
    "Traceback",
)


def test_zero3_launch_on_cpu_is_quiet_and_prints_only_rank_0(zero3_run):
    _, log = zero3_run
    for noise in NOISE:
        assert noise not in log, f"{noise!r} in the launch output:\n{log[-4000:]}"
    assert_ranks_logged(log)


def test_zero3_chunked_loss_trains_exactly_like_the_full_logits_loss(zero3_run, tiny_env, tmp_path):
    """Under ZeRO-3 the chunked loss reads the sharded lm_head directly; the student must end where the full-logits
    path (which calls the head as a module) takes it, from the same seeds and data."""
    from transformers import AutoModelForCausalLM

    env, paths = tiny_env
    chunked_dir, chunked_log = zero3_run
    assert FALLBACK_WARNING not in chunked_log
    full_dir = tmp_path / "full-logits"
    launch(env, "zero3", full_dir, *ZERO3_ARGS, "--memory_efficient_loss", "false")

    chunked = torch.load(chunked_dir / "probe_logits.pt")
    full = torch.load(full_dir / "probe_logits.pt")
    torch.testing.assert_close(chunked["logits"], full["logits"], rtol=0, atol=2e-5)
    with torch.no_grad():
        initial = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()(input_ids=full["input_ids"]).logits
    # Training moved the logits far more than the tolerance above, so the match is not vacuous.
    assert (full["logits"] - initial).abs().max() > 50 * 2e-5


def test_zero2_trains_on_two_ranks_and_saves_a_reloadable_student(zero2_run):
    out, log = zero2_run
    assert_ranks_logged(log)
    assert_metrics_gathered(out)
    assert_reload_matches(out)


def test_zero3_trains_on_two_ranks_and_saves_a_reloadable_student(zero3_run):
    out, log = zero3_run
    assert_ranks_logged(log)
    assert_metrics_gathered(out, steps=3)
    # zero3_save_16bit_model gathers the shards: the folder is an ordinary checkpoint, not DeepSpeed shards only.
    assert (out / "model.safetensors").exists()
    assert_reload_matches(out)
    assert all((out / f"checkpoint-{step}").is_dir() for step in (1, 2, 3))


def test_zero3_resumes_from_a_checkpoint_and_continues(zero3_run, tiny_env, tmp_path):
    first, _ = zero3_run
    env, _ = tiny_env
    out = tmp_path / "resumed"
    log = launch(env, "zero3", out, "--resume_from_checkpoint", str(first / "checkpoint-2"), "--max_steps", "3")
    assert_ranks_logged(log)
    # The history restored from checkpoint-2, then step 3 trained here, logged identically on both ranks.
    assert_metrics_gathered(out, steps=3)
    resumed = [e for e in histories(out)[0] if "loss" in e]
    original = [e for e in histories(first)[0] if "loss" in e]
    assert resumed[:2] == original[:2]
    # The scheduler continues where it stopped rather than restarting its warm-up or cosine.
    assert resumed[2]["learning_rate"] == original[2]["learning_rate"]
    assert_reload_matches(out)


def test_zero3_resume_restores_the_sharded_weights_exactly(zero3_run, tiny_env, tmp_path):
    # Resuming from the last checkpoint trains no further step, so the saved student must be the first run's
    # final student bit for bit: the ZeRO-3 shards of every rank were restored.
    first, _ = zero3_run
    env, _ = tiny_env
    out = tmp_path / "restored"
    launch(env, "zero3", out, "--resume_from_checkpoint", str(first / "checkpoint-3"), "--max_steps", "3")
    restored = torch.load(out / "probe_logits.pt")["logits"]
    final = torch.load(first / "probe_logits.pt")["logits"]
    torch.testing.assert_close(restored, final, rtol=0, atol=0)


def test_lora_student_under_zero3_with_tiny_models_built_by_the_launch(tiny_env, tmp_path):
    """Also the first use of `tiny://` on a machine: both ZeRO-3 processes build the tiny models themselves, after the
    ZeRO-3 arguments exist, and must still write them whole (unpartitioned)."""
    env, _ = tiny_env
    env = {**env, "TRL_EOPD_TINY_DIR": str(tmp_path / "fresh-tiny")}
    out = tmp_path / "lora"
    log = launch(env, "zero3", out, "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2")
    assert_ranks_logged(log)
    assert_metrics_gathered(out)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    assert_reload_matches(out, base=str(tmp_path / "fresh-tiny" / "student"))


def test_metrics_are_token_weighted_across_processes(tiny_env, tmp_path):
    """Two processes with a batch of 2 rows each log, for the step, what a float64 computation over all 4 rows gives:
    sums are gathered from every process before dividing, so the processes' uneven token counts weigh in. Evaluation
    on 3 rows, 2 per process, logs the values of those 3 rows: the row accelerate repeats to fill the second
    process's batch (the first, the longest) is not counted."""
    from test_trainer import ALL_METRICS, _hand_metrics, _per_token_float64, _threshold_in_a_gap, _uneven_dataset
    from transformers import AutoTokenizer

    from trl_eopd.collator import PromptKeepingChatMLCollator

    env, paths = tiny_env
    rows = list(_uneven_dataset())
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    collator = PromptKeepingChatMLCollator(tokenizer=AutoTokenizer.from_pretrained(paths["student"]), max_length=128)
    columns = _per_token_float64(paths, collator, rows, top_k=4)
    gate = _threshold_in_a_gap(torch.cat(columns["teacher_entropy"]), 0.1, 0.5)
    monitor = _threshold_in_a_gap(torch.cat(columns["teacher_entropy"]), 0.5, 0.9)
    expected = _hand_metrics(columns, entropy_threshold=gate, monitor_threshold=monitor)
    eval_order = [3, 0, 2]  # the 40-token row first
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("".join(json.dumps(rows[i]) + "\n" for i in eval_order))
    expected_eval = _hand_metrics({name: [values[i] for i in eval_order] for name, values in columns.items()},
                                  entropy_threshold=gate, monitor_threshold=monitor)  # fmt: skip

    out = tmp_path / "out"
    launch(
        env,
        "zero2",
        out,
        "--dataset_name",
        str(data),
        "--max_steps",
        "1",
        "--lmbda",
        "0",
        "--reverse_kl_estimator",
        "analytic",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--forward_kl_top_k",
        "4",
        "--forward_kl_coef",
        "0.5",
        "--entropy_threshold",
        repr(gate),
        "--monitor_entropy_threshold",
        repr(monitor),
        "--eval_dataset_name",
        str(eval_data),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
        "--per_device_eval_batch_size",
        "2",
        "--learning_rate",
        "0",
    )  # evaluated after the step: unchanged
    for history in histories(out):
        (log,) = [entry for entry in history if "loss" in entry]
        for key in ALL_METRICS:
            assert log[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        assert log["loss"] == pytest.approx(
            expected["eopd/loss_base"] + 0.5 * expected["eopd/loss_forward_gated"], rel=1e-5
        )
        eval_logs = [entry for entry in history if "eval_loss" in entry]  # at step 1, and the script's final one
        assert eval_logs
        for eval_log in eval_logs:
            for key in ALL_METRICS:
                assert eval_log[f"eval_{key}"] == pytest.approx(expected_eval[key], rel=1e-5, abs=1e-6), key
            assert eval_log["eval_loss"] == pytest.approx(
                expected_eval["eopd/loss_base"] + 0.5 * expected_eval["eopd/loss_forward_gated"], rel=1e-5
            )
