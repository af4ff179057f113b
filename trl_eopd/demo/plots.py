"""PNG figures of the demo: training curves from `trainer.state.log_history`, and pass@k by k.

`python -m trl_eopd.demo.plots eopd-demo` redraws both figures from a finished run's `results.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"teacher": "black", "student_init": "gray", "opd": "tab:red", "eopd": "tab:blue"}
LABELS = {"teacher": "teacher", "student_init": "student init", "opd": "OPD", "eopd": "EOPD"}
# (logged metric, panel title, y-axis label with its unit)
CURVES = [
    ("eopd/student_entropy", "student token entropy", "entropy (nats)"),
    (
        "eopd/monitor/student_high_entropy_ratio",
        "share of student tokens with entropy > 0.8 nats",
        "share of completion tokens",
    ),
    ("eopd/reverse_kl", "reverse KL(student || teacher)", "KL (nats per token)"),
    ("eopd/forward_kl", "forward KL(teacher || student)", "KL (nats per token)"),
    (
        "eopd/monitor/forward_kl_teacher_high_entropy",
        "forward KL on the teacher's high-entropy tokens",
        "KL (nats per high-entropy token)",
    ),
    ("eopd/teacher_entropy", "teacher token entropy on student rollouts", "entropy (nats)"),
]


GATED = ("eopd/high_entropy_ratio", "eopd/forward_kl_high_entropy")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_from_log_history(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The `eopd/*` training metrics as (step, value) pairs."""
    curves = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("eopd/") or key == "loss":
                curves.setdefault(key, []).append((entry.get("step", 0), float(value)))
    return curves


def plot_training_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """`runs[method]` is one curves dict per seed; each panel shows the seed mean and its min-max band."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title, ylabel) in zip(axes.flat, CURVES):
        for method, per_seed in runs.items():
            if key in GATED and method == "opd":
                continue
            series = [dict(curves[key]) for curves in per_seed if key in curves]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            values = np.array([[s[step] for step in steps] for s in series])
            ax.plot(steps, values.mean(0), color=COLORS[method], label=f"{LABELS[method]} (mean of {len(series)})")
            ax.fill_between(steps, values.min(0), values.max(0), color=COLORS[method], alpha=0.2)
        if key in GATED:
            # With entropy_threshold=inf no token is gated, so OPD logs 0 here; the evaluation table has OPD's value.
            title += "\n(OPD's gate is off, so only EOPD logs it)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Demo: on-policy distillation of the student, OPD vs EOPD, measured on its own rollouts during "
                 "training\n(line: mean over seeds; shaded band: min to max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pass_at_k(summary: dict[str, dict], ks: list[int], path: Path) -> None:
    """`summary[model]["pass@k"]` holds `{"mean", "std"}`; one line per model with ±std error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    seeds = set()
    for model, numbers in summary.items():
        means = [numbers[f"pass@{k}"]["mean"] for k in ks]
        stds = [numbers[f"pass@{k}"]["std"] for k in ks]
        seeds.add(len(numbers[f"pass@{ks[0]}"].get("values", [])) or None)
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, color=COLORS.get(model), label=LABELS.get(model, model))
    ax.set_xlabel("k (samples drawn per problem)")
    ax.set_ylabel("pass@k: share of problems solved by\nat least one of k samples (unbiased estimator)")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.02)
    count = next(iter(seeds)) if len(seeds) == 1 and None not in seeds else None
    over = f"{count} seeds" if count else "seeds"
    ax.set_title(f"Demo: pass@k on held-out target-sum problems\n(point: mean over {over}; error bar: ±1 standard "
                 "deviation across seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(output_dir: str | Path) -> list[Path]:
    """Draw both figures again from `<output_dir>/results.json`, e.g. after changing how they look."""
    import json

    output_dir = Path(output_dir)
    results = json.loads((output_dir / "results.json").read_text())
    runs = {method: [curves_from_log_history(run["log_history"]) for run in results["per_seed"][method]]
            for method in ("opd", "eopd")}
    summary = results["summary"]
    ks = sorted(int(key.split("@")[1]) for key in summary["teacher"] if key.startswith("pass@"))
    paths = [output_dir / "training_curves.png", output_dir / "pass_at_k.png"]
    plot_training_curves(runs, paths[0])
    plot_pass_at_k(summary, ks, paths[1])
    return paths


if __name__ == "__main__":
    import sys

    for written in replot(sys.argv[1] if len(sys.argv) > 1 else "eopd-demo"):
        print(f"Wrote {written}")
