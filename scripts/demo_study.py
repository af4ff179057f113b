"""The demo's OPD vs EOPD comparison over many seeds, resumable, for intervals narrow enough to read.

Each seed is one full `trl-eopd demo` seed (teacher evaluation, student warm-up, OPD and EOPD from that same
student, every model evaluated under the paper's protocol, top-p 0.8, and at top-p 1.0), with the demo's default
settings unless told otherwise. A finished seed is written to `<output-dir>/<regime>/seed<N>.json` at once, so an
interrupted study resumes where it stopped (rerun the same command); after every seed, `<output-dir>/study.json`
and the figures are rebuilt from every regime found there, so a partial study still gives results.

Two regimes (`--student-layers`): today's 2-layer student, and a student as deep as the 4-layer teacher. One process
per regime can run side by side (each uses one thread):

    python scripts/demo_study.py --student-layers 2 --seeds 20
    python scripts/demo_study.py --student-layers 4 --seeds 20
    python scripts/demo_study.py --aggregate-only          # rebuild study.json and the figures

Outputs (default `docs/demo_study/`): `study.json` (per regime: settings, seeds, mean/std per model and metric,
`paired_difference` EOPD - OPD with its 95% t interval, `gain_over_init` per method, wall time), `paired_difference.png`,
`mechanism.png` and `pass_at_k_<regime>.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "demo_study"
# Settings that may differ between two processes of one study without making their seeds incomparable.
FREE_SETTINGS = {"seeds", "device"}


def regime_name(student_layers: int, estimator: str) -> str:
    return f"{student_layers}-layer" + ("" if estimator == "analytic" else f"-{estimator}")


def _write_json(path: Path, data) -> None:
    # Two processes of one study rebuild study.json; a rename keeps a reader from ever seeing half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def load_regimes(output_dir: Path) -> dict[str, list[dict]]:
    regimes = {}
    for folder in sorted(p for p in output_dir.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in folder.glob("seed*.json")]
        if runs:
            regimes[folder.name] = sorted(runs, key=lambda r: r["seed"])
    return regimes


def aggregate_study(output_dir: Path) -> dict:
    """Rebuild `study.json` and the figures from every finished seed under `output_dir`."""
    from trl_eopd.demo.experiment import KS, MODELS, aggregate
    from trl_eopd.demo.plots import plot_mechanism, plot_paired_differences, plot_pass_at_k

    study = {}
    for regime, runs in load_regimes(output_dir).items():
        per_seed = {model: [run["models"][model] for run in runs] for model in MODELS}
        study[regime] = {
            "settings": runs[0]["settings"],
            "seeds": [run["seed"] for run in runs],
            "n_seeds": len(runs),
            **aggregate(per_seed),
            "wall_time_s": sum(run["wall_time_s"] for run in runs),
            "wall_time_per_seed_s": [run["wall_time_s"] for run in runs],
        }
    if not study:
        return study
    _write_json(output_dir / "study.json", study)
    labels = {regime: f"{regime} student ({data['n_seeds']} seeds)" for regime, data in study.items()}
    top_p = next(iter(study.values()))["settings"]["eval_top_p"]
    plot_paired_differences(
        {labels[r]: d["paired_difference"] for r, d in study.items()},
        output_dir / "paired_difference.png",
        top_p=top_p,
    )
    plot_mechanism({labels[r]: d["summary"] for r, d in study.items()}, output_dir / "mechanism.png", top_p=top_p)
    for regime, data in study.items():
        plot_pass_at_k(data["summary"], KS, output_dir / f"pass_at_k_{regime}.png", top_p=top_p)
    return study


PAIRED_COLUMNS = [
    ("pass@1", "pass@1"),
    ("pass@8", "pass@8"),
    ("distinct_correct", "distinct correct / problem"),
    ("token_entropy", "token entropy (nats)"),
    ("high_entropy_ratio_own", "high-entropy share (own)"),
]
MODEL_LABELS = {"teacher": "teacher", "student_init": "student init", "opd": "OPD", "eopd": "EOPD"}


def _interval(stat: dict) -> str:
    if stat["ci_low"] is None:
        return f"{stat['mean']:+.3f} (1 seed)"
    return f"{stat['mean']:+.3f} [{stat['ci_low']:+.3f}, {stat['ci_high']:+.3f}] ({stat['wins']}/{stat['n_seeds']})"


def markdown_tables(study: dict) -> str:
    """The study tables of docs/demo_study.md, printed from study.json so that every quoted number has a command behind it."""
    protocols = [("", "top-p 0.8 (paper)"), ("top_p1/", "top-p 1")]
    lines = [
        "EOPD - OPD, paired by seed: mean [95% t interval] (seeds where EOPD was higher / seeds)",
        "",
        "| student | evaluation | " + " | ".join(name for _, name in PAIRED_COLUMNS) + " |",
        "|---|---|" + "---|" * len(PAIRED_COLUMNS),
    ]
    for regime, data in study.items():
        for prefix, protocol in protocols:
            cells = [_interval(data["paired_difference"][prefix + key]) for key, _ in PAIRED_COLUMNS]
            lines.append(f"| {regime} ({data['n_seeds']} seeds) | {protocol} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each method minus its initial student, paired by seed, top-p 0.8: mean [95% t interval]",
        "",
        "| student | method | pass@1 | pass@8 | distinct correct / problem |",
        "|---|---|---|---|---|",
    ]
    for regime, data in study.items():
        for method in ("opd", "eopd"):
            gains = data["gain_over_init"][method]
            lines.append(
                f"| {regime} | {MODEL_LABELS[method]} | "
                + " | ".join(_interval(gains[key]) for key in ("pass@1", "pass@8", "distinct_correct"))
                + " |"
            )
    for prefix, protocol in protocols:
        lines += [
            "",
            f"Every model, {protocol}: mean ± std over seeds",
            "",
            "| student | model | " + " | ".join(name for _, name in PAIRED_COLUMNS) + " |",
            "|---|---|" + "---|" * len(PAIRED_COLUMNS),
        ]
        for regime, data in study.items():
            for model, label in MODEL_LABELS.items():
                stats = data["summary"][model]
                cells = [
                    f"{stats[prefix + key]['mean']:.3f} ± {stats[prefix + key]['std']:.3f}"
                    for key, _ in PAIRED_COLUMNS
                ]
                lines.append(f"| {regime} | {label} | " + " | ".join(cells) + " |")
    lines += [""] + [
        f"- {regime}: seeds {data['seeds'][0]}-{data['seeds'][-1]} ({data['n_seeds']}), "
        f"{data['wall_time_s'] / 60:.0f} min of seed runs, {data['wall_time_s'] / data['n_seeds']:.0f} s "
        "per seed."
        for regime, data in study.items()
    ]
    return "\n".join(lines)


class _StageReporter:
    """Shows the running seed's stage on the seed bar; the bar itself advances once per finished seed."""

    def __init__(self, bar):
        self.bar = bar

    def set_postfix_str(self, text):
        self.bar.set_postfix_str(text)

    def update(self):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds", type=int, default=20, help="Run seeds 0 .. N-1 (default 20); finished ones are skipped."
    )
    parser.add_argument("--first-seed", type=int, default=0, help="First seed (default 0).")
    parser.add_argument(
        "--student-layers", type=int, default=2, help="Student depth: 2 (default) or 4 (the teacher's)."
    )
    parser.add_argument(
        "--reverse-kl-estimator",
        choices=["analytic", "sampled"],
        default="analytic",
        help="Base term of both methods (default analytic); sampled uses its own learning rate.",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help="Where the per-seed JSON, study.json and the figures go (default docs/demo_study).",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("outputs/demo-study"),
        help="Scratch space for checkpoints and trainer output (default outputs/demo-study).",
    )
    parser.add_argument(
        "--stop-after-minutes",
        type=float,
        default=None,
        help="Start no new seed after this many minutes (the study resumes later).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="The demo's --quick settings (a pipeline check in seconds per seed, not a result).",
    )
    parser.add_argument("--aggregate-only", action="store_true", help="Only rebuild study.json and the figures.")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="With --aggregate-only: also print the study's tables in Markdown (as quoted in docs/demo_study.md).",
    )
    args = parser.parse_args(argv)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.aggregate_only:
        study = aggregate_study(args.output_dir)
        print(f"{len(study)} regime(s): " + ", ".join(f"{r} ({d['n_seeds']} seeds)" for r, d in study.items()))
        if args.markdown and study:
            print(markdown_tables(study))
        return 0

    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from trl_eopd.cli.quiet import tell_deepspeed_when_cpu_only

    tell_deepspeed_when_cpu_only()
    from trl_eopd.demo.experiment import DemoContext, DemoSettings, run_seed

    # One thread per process: the models are too small to gain from more, and two regimes can run side by side.
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()

    make = DemoSettings.quick_settings if args.quick else DemoSettings
    settings = make(student_layers=args.student_layers, reverse_kl_estimator=args.reverse_kl_estimator)
    regime = regime_name(args.student_layers, args.reverse_kl_estimator)
    regime_dir = args.output_dir / regime
    regime_dir.mkdir(exist_ok=True)
    recorded = {k: v for k, v in asdict(settings).items() if k not in FREE_SETTINGS}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for existing in regime_dir.glob("seed*.json"):
        theirs = json.loads(existing.read_text())["settings"]
        differ = sorted(k for k in recorded if theirs.get(k) != recorded[k])
        if differ:
            print(f"error: {existing} was run with other settings ({', '.join(differ)}); use another --output-dir.")
            return 2
    todo = [seed for seed in seeds if not (regime_dir / f"seed{seed}.json").exists()]
    print(f"{regime}: {len(seeds) - len(todo)} of {len(seeds)} seeds already done; running {len(todo)}.", flush=True)

    context = DemoContext(settings, args.work_dir / regime)
    start = time.time()
    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), desc=f"study {regime}", unit="seed")
    for seed in todo:
        if args.stop_after_minutes is not None and time.time() - start > 60 * args.stop_after_minutes:
            print(f"\nStopping after {(time.time() - start) / 60:.0f} min; rerun the same command to resume.")
            break
        seed_start = time.time()
        results = run_seed(context, seed, args.work_dir / regime, stages=_StageReporter(bar))
        for result in results.values():
            result.pop("log_history", None)
        _write_json(
            regime_dir / f"seed{seed}.json",
            {"seed": seed, "settings": recorded, "models": results, "wall_time_s": time.time() - seed_start},
        )
        study = aggregate_study(args.output_dir)
        stat = study[regime]["paired_difference"]["pass@8"]
        bar.update()
        bar.set_postfix_str(
            f"pass@8 EOPD-OPD {stat['mean']:+.3f} over {stat['n_seeds']} seeds, "
            f"last seed {time.time() - seed_start:.0f}s"
        )
    bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
