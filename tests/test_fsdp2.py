"""EOPD under FSDP2, for real, on CPU: two processes over gloo against one unsharded process, on the same data.

accelerate takes no FSDP path without GPUs, so `tests/fsdp2_harness.py` (test-only) shards the student and the teacher
with `fully_shard` as accelerate's FSDP2 preparation would and drives the trainer's `training_step` for a few AdamW
steps; it says what it stands in for. Under FSDP2 the teacher's `lm_head` is a sharded `DTensor` when the loss reads
it, and the student's layers gather and reshard around the loss: the loss, every gradient (`lm_head` included), and
the saved student must still be the single process's, to float32 rounding. The two ranks then sample completions
that end at different steps, which a sharded model must do in lockstep. About 1 minute on two cores for both
variants (the reference and the two ranks run side by side).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HARNESS = Path(__file__).resolve().parent / "fsdp2_harness.py"
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_both(paths: dict, out: Path, *extra: str, sharded_extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The unsharded reference (one process) and the FSDP2 run (two ranks), started together."""
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    common = [sys.executable, str(HARNESS), "--student", paths["student"], "--teacher", paths["teacher"],
              "--data", paths["dataset"], *extra]  # fmt: skip
    port = str(_free_port())
    single, sharded = out / "single", out / "fsdp2"
    commands = [[*common, str(single)]] + [
        [*common, str(sharded), "--world_size", "2", "--rank", str(rank), "--port", port, *sharded_extra]
        for rank in (0, 1)
    ]
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands
    ]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    return single, sharded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trl_eopd.tiny import save_tiny_setup

    return save_tiny_setup(tmp_path_factory.mktemp("tiny-fsdp2"), num_examples=8)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Full fine-tuning, then a LoRA student, in the same processes (one start-up for both)."""
    return _run_both(tiny, tmp_path_factory.mktemp("fsdp2"), sharded_extra=("--uneven_rollout",))


@pytest.fixture(scope="module")
def full_runs(runs):
    return tuple(run / "full" for run in runs)


@pytest.fixture(scope="module")
def lora_runs(runs):
    return tuple(run / "lora" for run in runs)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _assert_same_training(single: Path, sharded: Path, expected_trained: set[str]) -> None:
    ref, got = (json.loads((run / "losses.json").read_text()) for run in (single, sharded))
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL)
    # The loss moved: the steps trained, so matching it is not matching a constant.
    assert abs(ref["losses"][-1] - ref["losses"][0]) > 100 * RTOL * ref["losses"][0]
    ref_grads, grads = (torch.load(run / "grads_step0.pt") for run in (single, sharded))
    assert set(grads) == set(ref_grads) and expected_trained <= set(ref_grads), sorted(ref_grads)
    for name, reference in ref_grads.items():
        assert grads[name].shape == reference.shape, name
        if reference.norm() == 0:  # LoRA's A matrices, while every B is still zero
            assert name not in expected_trained and grads[name].norm() == 0, name
            continue
        assert _relative_error(grads[name], reference) < RTOL, name


def _assert_same_weights(single_model, sharded_model, initial_model) -> None:
    initial, ref, got = (m.state_dict() for m in (initial_model, single_model, sharded_model))
    moved = 0
    for name, reference in ref.items():
        update = reference - initial[name]
        if update.norm() == 0:
            torch.testing.assert_close(got[name], reference, rtol=0, atol=0)
            continue
        moved += 1
        # The sharded run's update of each tensor is the single run's, to 1e-5 of its size.
        assert _relative_error(got[name] - initial[name], update) < RTOL, name
    assert moved > 0


def test_fsdp2_loss_gradients_and_saved_student_equal_one_process(full_runs, tiny):
    from transformers import AutoModelForCausalLM

    single, sharded = full_runs
    _assert_same_training(single, sharded, {"lm_head.weight", "model.embed_tokens.weight"})
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in
              (single / "student", sharded / "student", tiny["student"])]  # fmt: skip
    _assert_same_weights(*models)


def test_fsdp2_lora_student_equals_one_process(lora_runs, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single, sharded = lora_runs
    ref_grads = torch.load(single / "grads_step0.pt")
    assert all("lora_" in name for name in ref_grads), sorted(ref_grads)  # only the adapter trains
    _assert_same_training(single, sharded, {name for name in ref_grads if "lora_B" in name})

    def load(adapter=None):
        base = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
        return base if adapter is None else PeftModel.from_pretrained(base, adapter).merge_and_unload()

    _assert_same_weights(load(single / "student"), load(sharded / "student"), load())


def test_fsdp2_ranks_sample_completions_that_end_at_different_steps(full_runs):
    """Every decoding step of a sharded student is a collective. Rank 0's completions end at their first token, rank
    1's run on: rank 0 keeps stepping with the others (transformers' synchronised generation, which needs the KV
    cache here) and neither hangs nor fails."""
    _, sharded = full_runs
    new_tokens = [json.loads((sharded / f"rollout_rank{rank}.json").read_text())["new_tokens"] for rank in (0, 1)]
    assert new_tokens[0] == 1 and new_tokens[1] > 1, new_tokens
