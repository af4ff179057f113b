"""`trl-eopd demo`: the task's grader, the pass@k estimator, and a `--quick` run end to end through EOPDTrainer."""

import json
import math
import os
import random
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest

from trl_eopd.demo.evaluate import pass_at_k
from trl_eopd.demo.stats import paired_difference, verdict
from trl_eopd.demo.task import Problem, build_tokenizer, check_solution, make_problems, sample_solution_text

ROOT = Path(__file__).resolve().parent.parent
PAIRED_KEYS = {"mean", "ci_low", "ci_high", "n_seeds"}


def independent_interval(baseline, treatment):
    """The paired 95% interval by another route: scipy's paired t-test on the two samples."""
    from scipy import stats

    result = stats.ttest_rel(treatment, baseline)
    interval = result.confidence_interval(0.95)
    return float(interval.low), float(interval.high)


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


def test_paired_difference_is_the_paired_t_interval():
    opd = [0.61, 0.58, 0.66, 0.70, 0.52, 0.64]
    eopd = [0.65, 0.59, 0.69, 0.74, 0.58, 0.63]
    stat = paired_difference(opd, eopd)
    diffs = [e - o for o, e in zip(opd, eopd)]
    assert stat["mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert (stat["ci_low"], stat["ci_high"]) == pytest.approx(independent_interval(opd, eopd))
    assert stat["n_seeds"] == 6 and stat["wins"] == 5 and stat["losses"] == 1
    assert stat["values"] == pytest.approx(diffs)
    # The pairing matters: the same numbers unpaired would give a much wider interval than the paired one.
    assert stat["ci_high"] - stat["ci_low"] < 0.1
    assert verdict(stat) == "ahead"
    assert verdict(paired_difference(eopd, opd)) == "behind"
    assert verdict(paired_difference([0.5, 0.6, 0.7], [0.6, 0.5, 0.7])) == "tie"


def test_paired_difference_with_one_seed_has_no_interval_and_bad_input_is_named():
    stat = paired_difference([0.5], [0.7])
    assert stat["mean"] == pytest.approx(0.2) and stat["ci_low"] is None and stat["ci_high"] is None
    assert stat["n_seeds"] == 1 and verdict(stat) == "tie"
    with pytest.raises(ValueError, match="one per seed"):
        paired_difference([0.5, 0.6], [0.7])
    with pytest.raises(ValueError, match="at least one seed"):
        paired_difference([], [])


def test_evaluation_top_p_reaches_the_sampler():
    from transformers import AutoTokenizer

    from trl_eopd.demo.evaluate import sample_completions
    from trl_eopd.demo.task import eval_problems
    from trl_eopd.demo.teacher import ASSETS_TEACHER, load_model

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS_TEACHER))
    teacher = load_model(ASSETS_TEACHER)
    problems = eval_problems(6)

    def distinct_per_problem(top_p):
        sequences, _ = sample_completions(
            teacher, tokenizer, problems, num_samples=8, seed=0, max_new_tokens=26, top_p=top_p
        )
        return [len({tuple(row.tolist()) for row in sequences[i * 8 : (i + 1) * 8]}) for i in range(len(problems))]

    # A nucleus this small keeps only the top token: every sample of a problem is the same greedy completion.
    assert distinct_per_problem(1e-6) == [1] * len(problems)
    # The teacher learnt several solutions per problem, so sampling its full distribution gives several.
    assert sum(distinct_per_problem(1.0)) > len(problems)


def test_demo_settings_follow_the_paper_and_reject_bad_values():
    from trl_eopd.demo.experiment import DemoSettings

    settings = DemoSettings()
    assert (settings.forward_kl_top_k, settings.eval_top_p, settings.num_eval_samples >= 8) == (16, 0.8, True)
    assert settings.learning_rate == 1e-3
    assert DemoSettings(reverse_kl_estimator="sampled").learning_rate == 3e-4
    assert DemoSettings(reverse_kl_estimator="sampled", learning_rate=1e-4).learning_rate == 1e-4
    with pytest.raises(ValueError, match="eval_top_p"):
        DemoSettings(eval_top_p=0.0)
    with pytest.raises(ValueError, match="num_eval_samples"):
        DemoSettings(num_eval_samples=4)
    with pytest.raises(ValueError, match="reverse_kl_estimator"):
        DemoSettings(reverse_kl_estimator="exact")


def test_tokenizer_round_trips_and_the_prompt_is_a_prefix(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = make_problems(1, seed=0)[0].messages("7 left 5 , 5 left 0")
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tokenizer(
        tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert full[: len(prompt)] == prompt
    assert tokenizer.convert_ids_to_tokens(full[len(prompt) :]) == "7 left 5 , 5 left 0 <|im_end|>".split()
    assert tokenizer.unk_token_id not in full


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    # A fresh process, as a user runs it: pytest's own warning filters would hide what the user sees.
    env = {**os.environ, "PYTHONWARNINGS": "default", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "trl_eopd.cli", "demo", "--quick", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
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
        "solution_coverage",
        "high_entropy_ratio_own",
        "high_entropy_ratio_teacher",
    ]
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

    # The paper's protocol, recorded: top-16 forward KL, evaluation at top-p 0.8, and top-p 1.0 beside it.
    settings = results["settings"]
    assert settings["eval_top_p"] == 0.8 and settings["forward_kl_top_k"] == 16
    assert settings["secondary_eval_top_p"] == 1.0
    for name in ("paired_difference.png", "mechanism.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    # Paired EOPD - OPD per metric, each checked against scipy's paired t-test on the per-seed values.
    paired = results["paired_difference"]
    for key in [
        "pass@1",
        "pass@8",
        "distinct_correct",
        "token_entropy",
        "high_entropy_ratio_own",
        "top_p1/pass@8",
        "top_p1/distinct_correct",
        "top_p1/token_entropy",
    ]:
        stat = paired[key]
        assert PAIRED_KEYS <= set(stat), key
        opd = [run[key] for run in results["per_seed"]["opd"]]
        eopd = [run[key] for run in results["per_seed"]["eopd"]]
        assert stat["n_seeds"] == len(settings["seeds"]) == len(opd)
        assert stat["mean"] == pytest.approx(sum(e - o for o, e in zip(opd, eopd)) / len(opd), abs=1e-12)
        if len({e - o for o, e in zip(opd, eopd)}) > 1:
            assert (stat["ci_low"], stat["ci_high"]) == pytest.approx(independent_interval(opd, eopd)), key
        assert stat["ci_low"] <= stat["mean"] <= stat["ci_high"], key
    assert set(results["gain_over_init"]) == {"opd", "eopd"}
    # The mechanism metrics, for every model and both protocols, in their ranges.
    for model, metrics in results["summary"].items():
        for prefix in ("", "top_p1/"):
            for value in metrics[prefix + "distinct_correct"]["values"]:
                assert 0.0 <= value <= settings["num_eval_samples"], (model, prefix)
            for value in metrics[prefix + "token_entropy"]["values"]:
                assert 0.0 <= value <= math.log(len(build_tokenizer())), (model, prefix)
            for value in metrics[prefix + "high_entropy_ratio_own"]["values"]:
                assert 0.0 <= value <= 1.0, (model, prefix)
    # The teacher's own rollouts have branch points but are mostly forced steps, whatever the sampler.
    teacher = results["summary"]["teacher"]
    for prefix in ("", "top_p1/"):
        assert 0.05 < teacher[prefix + "high_entropy_ratio_own"]["mean"] < 0.4
        assert teacher[prefix + "distinct_correct"]["mean"] > 1.5
    assert "EOPD - OPD" in proc.stdout and "95% CI" in proc.stdout


@pytest.mark.slow
def test_study_script_resumes_and_aggregates(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        str(ROOT / "scripts" / "demo_study.py"),
        "--quick",
        "--output-dir",
        str(tmp_path / "docs"),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    first = subprocess.run(command + ["--seeds", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "0 of 2 seeds already done; running 2" in first.stdout
    second = subprocess.run(command + ["--seeds", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "2 of 3 seeds already done; running 1" in second.stdout
    assert "3/3" in second.stderr  # the progress bar

    study = json.loads((tmp_path / "docs" / "study.json").read_text())
    regime = study["2-layer"]
    assert regime["seeds"] == [0, 1, 2] and regime["n_seeds"] == 3
    assert regime["settings"]["eval_top_p"] == 0.8
    runs = [json.loads((tmp_path / "docs" / "2-layer" / f"seed{seed}.json").read_text()) for seed in range(3)]
    for key in ("pass@8", "token_entropy"):
        opd = [run["models"]["opd"][key] for run in runs]
        eopd = [run["models"]["eopd"][key] for run in runs]
        stat = regime["paired_difference"][key]
        assert stat["mean"] == pytest.approx(sum(eopd) / 3 - sum(opd) / 3, abs=1e-12)
        if len({e - o for o, e in zip(opd, eopd)}) > 1:
            assert (stat["ci_low"], stat["ci_high"]) == pytest.approx(independent_interval(opd, eopd))
    for name in ("paired_difference.png", "mechanism.png", "pass_at_k_2-layer.png"):
        assert (tmp_path / "docs" / name).stat().st_size > 10_000

    # A study cannot silently mix seeds run with other settings.
    clash = subprocess.run(
        command + ["--seeds", "3", "--reverse-kl-estimator", "analytic"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert clash.returncode == 0
    seed_file = tmp_path / "docs" / "2-layer" / "seed0.json"
    data = json.loads(seed_file.read_text())
    data["settings"]["eval_top_p"] = 1.0
    seed_file.write_text(json.dumps(data))
    clash = subprocess.run(command + ["--seeds", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert clash.returncode == 2 and "eval_top_p" in clash.stdout


def test_committed_study_backs_its_page():
    """docs/demo_study.md quotes the committed study; its numbers must be the ones in docs/demo_study/study.json."""
    study = json.loads((ROOT / "docs" / "demo_study" / "study.json").read_text())
    page = (ROOT / "docs" / "demo_study.md").read_text()
    for regime, data in study.items():
        seeds = sorted(
            json.loads(p.read_text())["seed"] for p in (ROOT / "docs" / "demo_study" / regime).glob("seed*")
        )
        assert data["seeds"] == seeds and data["n_seeds"] == len(seeds)
        stat = data["paired_difference"]["pass@8"]
        quoted = f"{stat['mean']:+.3f} [{stat['ci_low']:+.3f}, {stat['ci_high']:+.3f}]"
        assert quoted in page, (regime, quoted)
    # The tables are the study script's own printout of that file, not a copy that can drift.
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_study", ROOT / "scripts" / "demo_study.py")
    demo_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_study)
    assert demo_study.markdown_tables(study) in page


def test_demo_without_its_extra_names_the_install_line(monkeypatch, capsys):
    import importlib.util

    from trl_eopd.demo import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real_find_spec(name, *a)
    )
    assert cli.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "scipy" in err and 'pip install -e ".[demo]"' in err and "matplotlib" not in err


def _one_demo_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trl-eopd demo: error: ") and "Traceback" not in err, err
    return lines[0]


def test_demo_refuses_a_folder_holding_results_unless_told(tmp_path, capsys, monkeypatch):
    from trl_eopd.demo import cli, experiment

    earlier = tmp_path / "results.json"
    earlier.write_text('{"summary": "an earlier run"}')
    for argv in (["--quick"], []):
        assert cli.main([*argv, "--output-dir", str(tmp_path)]) == 2
        line = _one_demo_error(capsys)
        assert f"{tmp_path} already holds a finished run" in line and "--overwrite-output-dir" in line
    assert earlier.read_text() == '{"summary": "an earlier run"}'

    class Reached(Exception):
        pass

    def reached(settings, output_dir, log=print):
        raise Reached(output_dir)

    monkeypatch.setattr(experiment, "run_demo", reached)
    with pytest.raises(Reached):
        cli.main(["--quick", "--output-dir", str(tmp_path), "--overwrite-output-dir"])
    err = capsys.readouterr().err
    assert f"warning: {tmp_path} already holds a finished run" in err and "replaces it" in err
    # An empty folder, or one without a demo's results, is not a finished run.
    with pytest.raises(Reached):
        cli.main(["--quick", "--output-dir", str(tmp_path / "fresh")])
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--seed", "3"], "--seed: did you mean --seeds?"),
        (["--step", "3"], "--step: did you mean --steps?"),
        (["--output_dir", "x"], "--output_dir: did you mean --output-dir?"),
    ],
)
def test_demo_takes_no_abbreviation_and_names_the_closest_option(tmp_path, capsys, argv, hint):
    from trl_eopd.demo import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--quick", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    line = _one_demo_error(capsys)
    assert "unrecognized arguments" in line and hint in line and "trl-eopd demo --help" in line
    assert not (tmp_path / "results.json").exists()
