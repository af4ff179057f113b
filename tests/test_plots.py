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
    log = [{"step": s, "loss": 1.0, "eopd/student_entropy": 1.0 / s, "eopd/monitor/student_high_entropy_ratio": 0.2,
            "eopd/reverse_kl": 0.5, "eopd/forward_kl": 0.4, "eopd/monitor/forward_kl_teacher_high_entropy": 0.3,
            "eopd/teacher_entropy": 0.3} for s in range(1, 4)]
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
