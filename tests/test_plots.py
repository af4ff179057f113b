"""Figures a person can read without the README: every panel labelled with units, error bars and bands explained, and
in the toy experiment each teacher mode in its own colour, so that a dropped mode can be seen."""

import importlib.util
from pathlib import Path

import matplotlib.figure
import pytest

from trl_eopd.demo.plots import plot_pass_at_k, plot_training_curves

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved_figures(monkeypatch):
    figures = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def _plotted_axes(figure):
    return [ax for ax in figure.axes if ax.lines or ax.collections]


def test_training_curves_have_units_and_explain_the_band(saved_figures, tmp_path):
    log = [
        {
            "step": s,
            "loss": 1.0,
            "eopd/student_entropy": 1.0 / s,
            "eopd/monitor/student_high_entropy_ratio": 0.2,
            "eopd/reverse_kl": 0.5,
            "eopd/forward_kl": 0.4,
            "eopd/monitor/forward_kl_teacher_high_entropy": 0.3,
            "eopd/teacher_entropy": 0.3,
        }
        for s in range(1, 4)
    ]
    from trl_eopd.demo.plots import curves_from_log_history

    curves = curves_from_log_history(log)
    plot_training_curves({"opd": [curves, curves], "eopd": [curves, curves]}, tmp_path / "curves.png")
    (figure,) = saved_figures
    axes = _plotted_axes(figure)
    assert len(axes) == 6
    for ax in axes:
        assert "(" in ax.get_ylabel() and "nats" in ax.get_ylabel() or "share" in ax.get_ylabel(), ax.get_ylabel()
        assert ax.get_xlabel() == "training step"
    assert "band" in figure._suptitle.get_text() and "over seeds" in figure._suptitle.get_text()


def test_pass_at_k_explains_its_error_bars(saved_figures, tmp_path):
    stats = {f"pass@{k}": {"mean": 0.5, "std": 0.1, "values": [0.4, 0.5, 0.6]} for k in (1, 2)}
    plot_pass_at_k({"teacher": stats, "opd": stats}, [1, 2], tmp_path / "passk.png")
    (figure,) = saved_figures
    (ax,) = figure.axes
    assert "error bar: ±1 standard deviation across seeds" in ax.get_title()
    assert "3 seeds" in ax.get_title()
    assert ax.get_ylabel().startswith("pass@k") and ax.get_xlabel().startswith("k")


def _summary(seeds):
    """A demo `summary` whose top-p 1 numbers differ from the headline protocol's, so a mix-up shows."""

    def stat(values):
        return {"mean": sum(values) / len(values), "std": 0.05, "values": values}

    metrics = ("distinct_correct", "token_entropy", "high_entropy_ratio_own")
    return {
        model: {
            **{m: stat([0.2 + 0.1 * i + 0.01 * s for s in range(seeds)]) for m in metrics},
            **{f"top_p1/{m}": stat([0.9 + 0.01 * s for s in range(seeds)]) for m in metrics},
        }
        for i, model in enumerate(("teacher", "student_init", "opd", "eopd"))
    }


def test_mechanism_shows_the_headline_protocol_with_every_seed_visible(saved_figures, tmp_path):
    from matplotlib.collections import PathCollection

    from trl_eopd.demo.plots import plot_mechanism

    summary = _summary(seeds=5)
    plot_mechanism({"": summary}, tmp_path / "mechanism.png", top_p=0.8)
    (figure,) = saved_figures
    assert "top-p 0.8" in figure._suptitle.get_text() and "top-p 1" not in figure._suptitle.get_text()
    for ax in figure.axes:
        metric = {"distinct": "distinct_correct", "entropy on": "token_entropy", "share": "high_entropy_ratio_own"}
        (key,) = [m for word, m in metric.items() if word in ax.get_title()]
        heights = [bar.get_height() for bar in ax.patches]
        assert heights == [summary[model][key]["mean"] for model in ("teacher", "student_init", "opd", "eopd")]
        dots = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert sum(len(c.get_offsets()) for c in dots) == 4 * 5
        bars_and_errors = [ax.patches[0].get_zorder()] + [line.get_zorder() for line in ax.lines]
        assert all(c.get_zorder() > max(bars_and_errors) for c in dots)
        # Spread sideways: the five seeds of a model are five distinct points, not a stack behind the error bar.
        assert len({round(x, 6) for x, _ in dots[0].get_offsets()}) == 5


def test_paired_difference_names_only_the_rows_it_has(saved_figures, tmp_path):
    from trl_eopd.demo.plots import plot_paired_differences

    def stat(mean):
        return {"mean": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.01, "n_seeds": 3, "wins": 2}

    keys = ("pass@1", "pass@8", "distinct_correct", "token_entropy", "high_entropy_ratio_own")
    demo = {**{k: stat(0.02) for k in keys}, **{f"top_p1/{k}": stat(-0.01) for k in keys}}
    plot_paired_differences({"": demo}, tmp_path / "demo.png", top_p=0.8)
    plot_paired_differences({"": {k: stat(0.02) for k in keys}}, tmp_path / "paper_only.png", top_p=0.8)
    plot_paired_differences({"2-layer student": demo, "4-layer student": demo}, tmp_path / "study.png", top_p=0.8)
    demo_fig, paper_only_fig, study_fig = saved_figures

    def how_to_read(figure):
        return figure.axes[-1].texts[0].get_text()

    def rows(figure):
        # Top to bottom, as a reader sees them (matplotlib lists tick labels from the bottom).
        return [label.get_text() for label in figure.axes[0].get_yticklabels()][::-1]

    assert "regime" not in how_to_read(demo_fig) and "Open square: top-p 1" in how_to_read(demo_fig)
    assert rows(demo_fig) == ["top-p 0.8 (paper)", "top-p 1"]
    assert "square" not in how_to_read(paper_only_fig) and rows(paper_only_fig) == ["top-p 0.8 (paper)"]
    assert "student regime" in how_to_read(study_fig)
    assert rows(study_fig)[0] == "2-layer student, top-p 0.8 (paper)" and len(rows(study_fig)) == 4


def test_toy_figure_shows_which_mode_collapsed(saved_figures, tmp_path):
    spec = importlib.util.spec_from_file_location("toy_experiment", ROOT / "scripts" / "toy_experiment.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    toy.main(["--output-dir", str(tmp_path), "--steps", "20"])
    (figure,) = saved_figures
    assert figure._suptitle is not None and "toy experiment" in figure._suptitle.get_text().lower()
    axes = _plotted_axes(figure)
    assert all(ax.get_ylabel() for ax in axes)
    titles = [ax.get_title() for ax in axes]
    # The mode-mass panels: one per method, each mode a different colour, the teacher's mass drawn as a reference.
    for method in ("reverse KL (OPD)", "EOPD"):
        (panel,) = [ax for ax in axes[5:] if ax.get_title().startswith(method)]
        curves = [line for line in panel.lines if line.get_linestyle() == "-"]
        assert len(curves) == 4
        assert len({line.get_color() for line in curves}) == 4
        assert len([line for line in panel.lines if line.get_linestyle() == ":"]) == 4
    # Panel titles are short enough not to run into each other at this figure width.
    width_in_chars = figure.get_figwidth() / len(figure.axes[:5]) * 72 / 6
    assert all(len(title) < width_in_chars for title in titles), titles


def test_default_outputs_are_ignored_by_git(tmp_path):
    import shutil
    import subprocess

    import yaml

    from trl_eopd.cli.recipes import recipe_path
    from trl_eopd.demo.cli import build_parser
    from trl_eopd.evaluation.runner import default_output_dir

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    spec = importlib.util.spec_from_file_location("toy_experiment", ROOT / "scripts" / "toy_experiment.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    defaults = [
        f"{toy.DEFAULT_OUTPUT_DIR}/toy_experiment.png",
        f"{build_parser().get_default('output_dir')}/results.json",
        f"{yaml.safe_load(recipe_path('tiny-cpu').read_text())['output_dir']}/model.safetensors",
        f"{default_output_dir('Qwen/Qwen3-1.7B')}/summary.json",
    ]
    for path in defaults:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False).returncode == 0
        assert ignored, f"{path} would show as untracked in a checkout"
