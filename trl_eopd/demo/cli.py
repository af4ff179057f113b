"""`trl-eopd demo`: OPD versus EOPD on a built-in synthetic reasoning task, on CPU, with nothing to download."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from ..cli.errors import one_line_errors
from ..cli.preflight import finished_run

PROG = "trl-eopd demo"
# What the `demo` extra installs: plots and paired t intervals. Training itself needs neither.
DEMO_EXTRA_MODULES = ("matplotlib", "scipy")

DESCRIPTION = """\
Distil a small student from a small teacher on a synthetic reasoning task (reach a target sum with numbers from a
given set; every problem has several valid solutions and every answer is checked), twice from the same
initialisation: with OPD (reverse KL only, entropy_threshold=inf) and with EOPD (forward KL added on tokens where the
teacher's entropy exceeds the threshold, over the teacher's top-16 tokens as in the paper). Both runs go through
EOPDTrainer. Evaluation follows the paper: temperature 1.0, top-p 0.8, 16 samples per problem, unbiased pass@k; the
same numbers at top-p 1.0 are reported beside them. Prints, for the teacher and both students, the mean and standard
deviation over seeds of pass@k (k = 1..8), the distinct correct solutions per problem, token entropy, the share of
high-entropy tokens and the forward KL on the teacher's high-entropy tokens, then the paired difference EOPD - OPD per
metric with its 95% interval over seeds; writes the figures (PNG) and every number (results.json) into --output-dir.
scripts/demo_study.py runs the same comparison over 20+ seeds."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    # No abbreviations: `--seed 3` must not be taken as `--seeds 3`.
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=None, help="Distillation steps per run (default 200; quick 6).")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="Seeds; each gives its own warm-started student (default 0 1 2; quick 0 1).",
    )
    parser.add_argument(
        "--output-dir",
        default="eopd-demo",
        help="Where to write results.json and the PNGs; a folder holding a demo's results.json is "
        "refused unless --overwrite-output-dir is given.",
    )
    parser.add_argument(
        "--overwrite-output-dir", action="store_true", help="Replace the results already in --output-dir."
    )
    parser.add_argument("--device", default="cpu", help="Torch device, e.g. cpu or cuda (default cpu).")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A 20-second run of the whole pipeline on fewer problems, seeds and steps (for CI).",
    )
    parser.add_argument(
        "--entropy-threshold", type=float, default=None, help="EOPD's gate in nats (default 0.8, the paper's)."
    )
    parser.add_argument(
        "--reverse-kl-estimator",
        choices=["analytic", "sampled"],
        default=None,
        help="Base term of both methods (default analytic, EOPDConfig's default; sampled is the paper's "
        "single-sample estimator).",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Distillation learning rate (default 1e-3 with the analytic base term, 3e-4 with the "
        "sampled one, whose noisier gradient needs a smaller step).",
    )
    parser.add_argument(
        "--forward-kl-top-k",
        type=int,
        default=None,
        help="EOPD's forward KL over the teacher's top-k tokens (default 16, the paper's); 0 for the full vocabulary.",
    )
    parser.add_argument(
        "--eval-top-p",
        type=float,
        default=None,
        help="Nucleus mass of the evaluation sampler (default 0.8, the paper's); the demo also reports "
        "top-p 1.0 beside it.",
    )
    parser.add_argument(
        "--student-layers", type=int, default=None, help="Depth of the student (default 2; the teacher has 4)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; the numbers go to stdout and to `<output-dir>/results.json`. Returns the exit status."""
    parser = one_line_errors(build_parser(prog=PROG))
    args = parser.parse_args(argv)
    missing = [name for name in DEMO_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"{PROG}: error: the demo's plots and statistics need {' and '.join(missing)}, which are not "
            f'installed: run `pip install -e ".[demo]"` in your trl-eopd clone (the `test` extra includes it).',
            file=sys.stderr,
        )
        return 2
    earlier = finished_run(args.output_dir, ("results.json",))
    if earlier and not args.overwrite_output_dir:
        # Refused rather than announced as `train` does: the demo has no checkpoint to resume, so a rerun would only
        # replace the earlier numbers and figures.
        print(
            f"{PROG}: error: {earlier}. Pass --overwrite-output-dir to replace it, or --output-dir elsewhere to "
            "keep it.",
            file=sys.stderr,
        )
        return 2

    import torch

    from ..cli.quiet import tell_deepspeed_when_cpu_only

    tell_deepspeed_when_cpu_only()
    from transformers.utils import logging as hf_logging

    from .experiment import PAIRED_METRICS, DemoSettings, format_paired, format_table, run_demo, secondary_prefix

    overrides = {
        "steps": args.steps,
        "seeds": args.seeds,
        "device": args.device,
        "entropy_threshold": args.entropy_threshold,
        "reverse_kl_estimator": args.reverse_kl_estimator,
        "learning_rate": args.learning_rate,
        "eval_top_p": args.eval_top_p,
        "student_layers": args.student_layers,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.forward_kl_top_k is not None:
        overrides["forward_kl_top_k"] = args.forward_kl_top_k or None
    try:
        if args.quick:
            settings = DemoSettings.quick_settings(**overrides)
        else:
            settings = DemoSettings(**overrides)
    except ValueError as error:
        parser.error(str(error))
    if earlier:
        print(f"[trl-eopd] warning: {earlier}; this run replaces it (--overwrite-output-dir).", file=sys.stderr)

    # One thread: these models are too small to gain from more, and a fixed count keeps the floating-point results,
    # and so the printed table, the same on every machine.
    previous_threads = torch.get_num_threads()
    previous_verbosity = hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    start = time.time()
    try:
        results = run_demo(settings, args.output_dir)
    finally:
        torch.set_num_threads(previous_threads)
        hf_logging.set_verbosity(previous_verbosity)

    output_dir = Path(args.output_dir)
    print()
    print(
        f"EOPD demo: {settings.steps} distillation steps x batch {settings.batch_size}, seeds {settings.seeds}, "
        f"{settings.num_eval_problems} held-out problems x {settings.num_eval_samples} samples, "
        f"threshold {settings.entropy_threshold} nats, forward KL top-k {settings.forward_kl_top_k}, base term "
        f"{settings.reverse_kl_estimator!r} at lr {settings.learning_rate:g}, {settings.student_layers}-layer student"
    )
    print(
        f"Evaluation: temperature 1.0, top-p {settings.eval_top_p:g}. mean ± std over seeds; hiH own / hiH tchr: "
        "share of the model's rollout tokens where its own / the teacher's entropy exceeds the threshold; fKL hiH: "
        "forward KL on the teacher's high-entropy tokens"
    )
    print(format_table(results["summary"]))
    prefixes = [""]
    if settings.secondary_eval_top_p is not None:
        prefixes.append(secondary_prefix(settings.secondary_eval_top_p))
    print(
        f"\nPaired by seed (same initial student), 95% t interval over {len(settings.seeds)} seeds; "
        f"'{prefixes[-1]}' rows: evaluation at top-p {settings.secondary_eval_top_p}"
    )
    print(format_paired(results["paired_difference"], PAIRED_METRICS, prefixes))
    names = ", ".join(
        str(output_dir / name)
        for name in ("results.json", "training_curves.png", "pass_at_k.png", "paired_difference.png", "mechanism.png")
    )
    print(f"\nWrote {names} in {time.time() - start:.0f}s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
