"""scripts/gpu_check.py runs end to end at its tiny preset, and its correctness section catches a wrong gradient.

The script is what a lent GPU will run once; running its CPU preset here keeps every code path it takes working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SECTIONS = ("versions", "correctness", "loss_stage", "training_steps", "fsdp2", "targets")
LOSSES = ("gkd_full_logits", "eopd_full_logits", "eopd_chunked", "trl_chunked_divergence")
TRAINERS = ("eopd", "distillation", "gkd")

# Runs the script in-process after wrapping one function of the chunked loss, through the script's own import helper
# (so the plant follows the module when it moves).
PLANT_BUG = """
import runpy, sys
script = runpy.run_path(sys.argv[1])
module = script["chunked_loss_module"]()
original = module._add_projection_gradients

def planted(grad, hidden, weight, grad_hidden, grad_weight, grad_bias, scale):
    # A 0.1% error in every gradient: small enough to hide in bf16, far above float32's tolerance.
    return original(grad, hidden, weight, grad_hidden, grad_weight, grad_bias, scale * 1.001)

module._add_projection_gradients = planted
sys.exit(script["main"](sys.argv[2:]))
"""


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")  # fmt: skip
    return env


def _run(args, timeout=180):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = _run([sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_section_is_reported(tiny_report):
    report, table = tiny_report
    for section in SECTIONS:
        assert section in report, section
    assert report["errors"] == {} and report["skipped"] == []
    assert report["versions"]["torch"] and report["versions"]["trl"].startswith("1.16")
    assert set(report["loss_stage"]["results"]) == set(LOSSES)
    for name, result in report["loss_stage"]["results"].items():
        assert result["status"] == "ok", (name, result)
        assert result["median_s"] > 0 and len(result["times_s"]) == report["loss_stage"]["shape"]["repeats"]
    assert set(report["training_steps"]["results"]) == set(TRAINERS)
    for name, result in report["training_steps"]["results"].items():
        assert 0 < result["rollout_s"] < result["step_s"], (name, result)
        assert result["tokens_per_s"] > 0
    for ratio in ("chunked_time_vs_trl", "eopd_tokens_per_s_vs_distillation"):
        assert report["targets"][ratio] > 0
    # On CPU the allocator can serve the chunked loss's buffers from memory it already holds: a peak of 0 above the
    # inputs is a measurement there, not a missing one.
    assert report["targets"]["chunked_peak_vs_trl"] >= 0
    assert "| eopd_chunked | ok |" in table and "| distillation |" in table


def test_correctness_covers_every_option_and_passes(tiny_report):
    report, _ = tiny_report
    cases = report["correctness"]["cases"]
    assert report["correctness"]["passed"] and all(case["passed"] for case in cases)
    for dtype in ("float32", "bfloat16"):
        options = {
            (c["gate"], c["reverse_kl_estimator"], c["beta"], c["forward_kl_top_k"])
            for c in cases
            if c["dtype"] == dtype
        }
        assert len(options) == 2 * 4 * 2, dtype
        assert any(c["head"] == "bias_scale_softcap" for c in cases if c["dtype"] == dtype)
    for case in cases:
        # Both gate branches are taken, away from the threshold.
        assert 0 < case["num_high_entropy"] < case["num_tokens"] and case["gate_margin_nats"] > 0.05
        assert {"loss", "grad_hidden", "grad_weight"} <= set(case["errors"])


def test_fsdp2_section_shards_and_matches_the_unsharded_models(tiny_report):
    report, table = tiny_report
    fsdp2 = report["fsdp2"]
    assert fsdp2["passed"] and fsdp2["world_size"] == 1 and fsdp2["student_dtensor_params"] > 0
    # The tiny student ties its head to the embedding: its gradient is checked under that name.
    assert fsdp2["lm_head_parameter"] == "model.embed_tokens.weight"
    assert fsdp2["loss"]["relative_error"] <= fsdp2["tolerance"]
    assert fsdp2["max_grad_relative_error"] <= fsdp2["tolerance"]
    assert fsdp2["max_update_relative_error"] <= fsdp2["tolerance"]
    assert "## FSDP2 (world size 1)" in table


# The loss reading the sharded output heads as they are, without turning them into full tensors first.
PLANT_FSDP2_BUG = """
import runpy, sys
import trl_eopd.trainer
trl_eopd.trainer.gathered = lambda projection: projection
script = runpy.run_path(sys.argv[1])
sys.exit(script["main"](sys.argv[2:]))
"""


def test_fsdp2_section_fails_when_the_loss_reads_sharded_heads(tmp_path):
    result = _run([sys.executable, "-c", PLANT_FSDP2_BUG, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--out",
                   str(tmp_path), "--sections", "fsdp2"])  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "DTensor" in report["errors"]["fsdp2"]


def test_a_planted_gradient_bug_fails_the_check(tmp_path):
    result = _run([sys.executable, "-c", PLANT_BUG, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--out",
                   str(tmp_path), "--sections", "correctness"])  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["correctness"]["passed"] is False
    float32 = [case for case in report["correctness"]["cases"] if case["dtype"] == "float32"]
    tolerance = report["correctness"]["tolerances"]["float32"]["grad"]
    assert float32 and not any(case["passed"] for case in float32)
    assert all(case["errors"]["grad_hidden"] > tolerance for case in float32)
