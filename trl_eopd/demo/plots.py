"""PNG figures of the demo: training curves from `trainer.state.log_history`, pass@k by k, the paired difference
EOPD - OPD per metric, and the mechanism (distinct solutions, entropy) per model.

`python -m trl_eopd.demo.plots eopd-demo` redraws the figures from a finished run's `results.json`.
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
    fig.suptitle(
        "Demo: on-policy distillation of the student, OPD vs EOPD, measured on its own rollouts during "
        "training\n(line: mean over seeds; shaded band: min to max over seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pass_at_k(summary: dict[str, dict], ks: list[int], path: Path, top_p: float | None = None) -> None:
    """`summary[model]["pass@k"]` holds `{"mean", "std"}`; one line per model with ±std error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    seeds = set()
    for model, numbers in summary.items():
        means = [numbers[f"pass@{k}"]["mean"] for k in ks]
        stds = [numbers[f"pass@{k}"]["std"] for k in ks]
        seeds.add(len(numbers[f"pass@{ks[0]}"].get("values", [])) or None)
        ax.errorbar(
            ks, means, yerr=stds, marker="o", capsize=3, color=COLORS.get(model), label=LABELS.get(model, model)
        )
    ax.set_xlabel("k (samples drawn per problem)")
    ax.set_ylabel("pass@k: share of problems solved by\nat least one of k samples (unbiased estimator)")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.02)
    count = next(iter(seeds)) if len(seeds) == 1 and None not in seeds else None
    over = f"{count} seeds" if count else "seeds"
    protocol = f", temperature 1, top-p {top_p:g}" if top_p is not None else ""
    ax.set_title(
        f"Demo: pass@k on held-out target-sum problems{protocol}\n(point: mean over {over}; error bar: ±1 "
        "standard deviation across seeds)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (metric, panel title, unit) of the paired-difference and mechanism figures.
PAIRED_PANELS = [
    ("pass@1", "pass@1", "difference in share of samples correct"),
    ("pass@8", "pass@8", "difference in share of problems solved"),
    ("distinct_correct", "distinct correct solutions per problem", "difference in solutions per problem"),
    ("token_entropy", "token entropy on own rollouts", "difference in nats"),
    ("high_entropy_ratio_own", "share of own tokens with entropy > 0.8", "difference in share of tokens"),
]
MECHANISM_PANELS = [
    ("distinct_correct", "distinct correct solutions per problem\n(among its samples)", "solutions per problem"),
    ("token_entropy", "token entropy on the model's own rollouts", "entropy (nats per token)"),
    ("high_entropy_ratio_own", "share of the model's own tokens\nwith its entropy > 0.8 nats", "share of tokens"),
]


def _protocol_prefixes(stats: dict) -> list[tuple[str, str]]:
    """(key prefix, label) of every evaluation protocol present: the paper's first, then `top_p1/` if measured."""
    prefixes = [("", "")]
    for key in stats:
        if key.startswith("top_p") and "/" in key:
            prefix = key.split("/")[0] + "/"
            if prefix not in [p for p, _ in prefixes]:
                prefixes.append((prefix, prefix.rstrip("/").replace("top_p", "top-p ")))
    return prefixes


def plot_paired_differences(regimes: dict[str, dict], path: Path, top_p: float = 0.8) -> None:
    """`regimes[label]` is a `paired_difference` dict; one panel per metric, one row per regime and protocol, each a
    mean EOPD - OPD with its 95% interval over seeds. A single regime labelled `""` (the demo's) gets rows named by
    protocol only."""
    plt = _pyplot()
    height = 1.2 + 0.5 * 2 * len(regimes)
    fig, grid = plt.subplots(2, 3, figsize=(16, 2 * height + 1.2))
    axes = list(grid.flat)
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    secondary_labels = set()
    for ax, (metric, title, unit) in zip(axes, PAIRED_PANELS):
        rows = []
        for i, (regime, paired) in enumerate(regimes.items()):
            for prefix, label in _protocol_prefixes(paired):
                stat = paired.get(prefix + metric)
                if stat is None:
                    continue
                protocol = label or f"top-p {top_p:g} (paper)"
                name = f"{regime}, {protocol}" if regime else protocol
                rows.append((name, stat, palette[i % len(palette)], prefix != ""))
                if prefix:
                    secondary_labels.add(label)
        for y, (_name, stat, color, secondary) in enumerate(reversed(rows)):
            mean = stat["mean"]
            if stat["ci_low"] is not None:
                ax.errorbar(
                    mean,
                    y,
                    xerr=[[mean - stat["ci_low"]], [stat["ci_high"] - mean]],
                    fmt="s" if secondary else "o",
                    color=color,
                    capsize=4,
                    mfc="white" if secondary else color,
                )
            else:
                ax.plot(mean, y, "o", color=color)
            ax.annotate(
                f"{stat['wins']}/{stat['n_seeds']}",
                (mean, y),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=7,
                color=color,
            )
        ax.axvline(0, color="black", lw=1)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(
            [name for name, *_ in reversed(rows)] if ax in (axes[0], axes[3]) else [""] * len(rows), fontsize=8
        )
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"EOPD − OPD ({unit})", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    axes[-1].axis("off")
    several = len(regimes) > 1 or any(regimes)
    lines = [
        "How to read: each row is "
        + ("one student regime and one\nevaluation protocol;" if several else "one evaluation protocol;"),
        "the marker is the mean over seeds of EOPD − OPD, the bar",
        "its 95% t interval. An interval that crosses the black line",
        "at 0 means no difference was detected.",
        f"Filled circle: the paper's protocol (top-p {top_p:g}).",
    ]
    lines += [f"Open square: {', '.join(sorted(secondary_labels))}."] if secondary_labels else []
    lines += ["Number above a marker: seeds where EOPD was higher."]
    axes[-1].text(0, 0.5, "\n".join(lines), fontsize=9, va="center")
    n_seeds = {stat["n_seeds"] for paired in regimes.values() for stat in paired.values()}
    fig.suptitle(
        "EOPD − OPD from the same initial student, paired by seed: mean and 95% t interval over "
        f"{'/'.join(map(str, sorted(n_seeds)))} seeds (right of 0: EOPD higher; "
        "label: seeds where EOPD was higher)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mechanism(regimes: dict[str, dict], path: Path, top_p: float = 0.8) -> None:
    """`regimes[label]` is a demo `summary`; bars per model (teacher, initial student, OPD, EOPD) for the paper's
    mechanism: how many different correct solutions a model finds and how spread its own token distribution is.

    The bars are the evaluation's main protocol (top-p `top_p`, the one the printed headline uses), and each seed is a
    dot drawn over its bar and error bar, spread sideways so that the seeds can be counted."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(regimes), len(MECHANISM_PANELS), figsize=(13, 3.6 * len(regimes)), squeeze=False)
    for row, (regime, summary) in enumerate(regimes.items()):
        for ax, (metric, title, unit) in zip(axes[row], MECHANISM_PANELS):
            models = [m for m in COLORS if m in summary]
            for x, model in enumerate(models):
                stat = summary[model][metric]
                ax.bar(x, stat["mean"], color=COLORS[model], alpha=0.8, zorder=1)
                ax.errorbar(x - 0.25, stat["mean"], yerr=stat["std"], color="black", capsize=4, zorder=2)
                values = stat.get("values", [])
                # A fixed spread over the middle of the bar: the same picture on every redraw.
                offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
                ax.scatter(x + offsets, values, s=10, color="black", edgecolors="white", linewidths=0.5, zorder=3)
                ax.annotate(
                    f"{stat['mean']:.3f}",
                    (x, stat["mean"]),
                    textcoords="offset points",
                    xytext=(14, 2),
                    fontsize=7,
                    zorder=4,
                )
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels([LABELS[m] for m in models])
            ax.set_ylabel(unit)
            ax.set_title(f"{regime}: {title}" if regime else title, fontsize=9)
            ax.grid(alpha=0.3, axis="y", zorder=0)
            ax.set_axisbelow(True)
    fig.suptitle(
        f"Does the student keep the teacher's spread? Rollouts sampled at temperature 1, top-p {top_p:g}; "
        "bar: mean over seeds, error bar (left of centre): ±1 std, dots: one per seed",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(output_dir: str | Path) -> list[Path]:
    """Draw both figures again from `<output_dir>/results.json`, e.g. after changing how they look."""
    import json

    output_dir = Path(output_dir)
    results = json.loads((output_dir / "results.json").read_text())
    runs = {
        method: [curves_from_log_history(run["log_history"]) for run in results["per_seed"][method]]
        for method in ("opd", "eopd")
    }
    summary = results["summary"]
    ks = sorted(int(key.split("@")[1]) for key in summary["teacher"] if key.startswith("pass@"))
    paths = [output_dir / "training_curves.png", output_dir / "pass_at_k.png"]
    plot_training_curves(runs, paths[0])
    plot_pass_at_k(summary, ks, paths[1], top_p=results["settings"].get("eval_top_p"))
    if "paired_difference" in results:
        paths += [output_dir / "paired_difference.png", output_dir / "mechanism.png"]
        plot_paired_differences({"": results["paired_difference"]}, paths[2], top_p=results["settings"]["eval_top_p"])
        plot_mechanism({"": summary}, paths[3], top_p=results["settings"]["eval_top_p"])
    return paths


if __name__ == "__main__":
    import sys

    for written in replot(sys.argv[1] if len(sys.argv) > 1 else "eopd-demo"):
        print(f"Wrote {written}")
