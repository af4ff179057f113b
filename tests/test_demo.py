"""`trl-eopd demo`: the task's grader, the pass@k estimator, and a `--quick` run end to end through EOPDTrainer."""

import json
import os
import random
import subprocess
import sys
from math import comb

import pytest

from trl_eopd.demo.evaluate import pass_at_k
from trl_eopd.demo.task import Problem, build_tokenizer, check_solution, make_problems, sample_solution_text


def test_grader_accepts_every_valid_solution_and_rejects_broken_ones():
    problem = Problem(numbers=(2, 3, 5, 7, 9, 11), target=12, solutions=((3, 9), (5, 7), (2, 3, 7)))
    assert check_solution(problem, "7 left 5 , 5 left 0".split()) == (5, 7)
    assert check_solution(problem, "2 left 10 , 7 left 3 , 3 left 0".split()) == (2, 3, 7)
    for wrong in [
        "7 left 4 , 5 left 0",  # wrong remainder
        "6 left 6 , 6 left 0",  # numbers not in the set, and reused
        "3 left 9 , 3 left 6",  # reused, never reaches 0
        "12 left 0",  # not in the set, single number
        "7 left 5 , 5 left 0 ,",  # trailing separator
        "",
    ]:
        assert check_solution(problem, wrong.split()) is None, wrong
    rng = random.Random(0)
    for problem in make_problems(50, seed=3):
        assert len(problem.solutions) >= 2
        assert check_solution(problem, sample_solution_text(problem, rng).split()) in problem.solutions


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 9, 8) == 1.0  # fewer than k wrong samples
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    assert pass_at_k(16, 4, 8) == pytest.approx(1 - comb(12, 8) / comb(16, 8))


def test_tokenizer_round_trips_and_the_prompt_is_a_prefix(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = make_problems(1, seed=0)[0].messages("7 left 5 , 5 left 0")
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tokenizer(tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    assert tokenizer.convert_ids_to_tokens(full[len(prompt):]) == "7 left 5 , 5 left 0 <|im_end|>".split()
    assert tokenizer.unk_token_id not in full


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    # A fresh process, as a user runs it: pytest's own warning filters would hide what the user sees.
    env = {**os.environ, "PYTHONWARNINGS": "default", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "trl_eopd.cli", "demo", "--quick", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Readable output: no per-step log dicts, no warnings, and a stage bar that reaches its end.
    output = proc.stdout + proc.stderr
    assert "{'loss'" not in output
    assert "warn" not in output.lower(), output[-4000:]
    stages = 2 * 4  # --quick: 2 seeds x (teacher eval, warm-up, OPD, EOPD)
    assert f"| {stages}/{stages} [" in proc.stderr and f"/{stages + 1}" not in proc.stderr
    for name in ("training_curves.png", "pass_at_k.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"teacher", "student_init", "opd", "eopd"}
    assert results["settings"]["quick"] and len(results["settings"]["seeds"]) >= 2

    probability_keys = [f"pass@{k}" for k in range(1, 9)] + [
        "solution_coverage", "high_entropy_ratio_own", "high_entropy_ratio_teacher"]
    for model, metrics in results["summary"].items():
        for key in probability_keys + ["distinct_correct", "token_entropy", "forward_kl_high_entropy"]:
            assert {"mean", "std", "values"} <= set(metrics[key]), (model, key)
        for key in probability_keys:
            assert all(0.0 <= v <= 1.0 for v in metrics[key]["values"]), (model, key)
        for run in results["per_seed"][model]:
            curve = [run[f"pass@{k}"] for k in range(1, 9)]
            assert curve == sorted(curve), (model, curve)
    # The shipped teacher solves the task; a broken checkpoint or grader would show up here.
    assert results["summary"]["teacher"]["pass@8"]["mean"] > 0.8
    assert results["summary"]["teacher"]["forward_kl_high_entropy"]["mean"] == pytest.approx(0.0, abs=1e-6)

    # Both methods went through EOPDTrainer and logged its metrics; only EOPD's gate opened, but both report their
    # high-entropy shares at the monitoring threshold, so OPD and EOPD compare.
    for method, gated in (("opd", False), ("eopd", True)):
        for run in results["per_seed"][method]:
            logged = [entry for entry in run["log_history"] if "eopd/reverse_kl" in entry]
            assert logged, method
            assert any(entry["eopd/high_entropy_ratio"] > 0 for entry in logged) is gated, method
            for key in ("eopd/monitor/teacher_high_entropy_ratio", "eopd/monitor/student_high_entropy_ratio"):
                assert all(0.0 <= entry[key] <= 1.0 for entry in logged), (method, key)
                assert any(entry[key] > 0 for entry in logged), (method, key)
    assert "pass@8" in proc.stdout
