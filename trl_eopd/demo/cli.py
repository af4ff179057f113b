"""`trl-eopd demo`: OPD versus EOPD on a built-in synthetic reasoning task, on CPU, with nothing to download."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DESCRIPTION = """\
Distil a small student from a small teacher on a synthetic reasoning task (reach a target sum with numbers from a
given set; every problem has several valid solutions and every answer is checked), twice from the same
initialisation: with OPD (reverse KL only, entropy_threshold=inf) and with EOPD (forward KL added on tokens where the
teacher's entropy exceeds the threshold). Both runs go through EOPDTrainer. Prints, for the teacher and both students,
the mean and standard deviation over seeds of pass@k (k = 1..8, unbiased estimator), the distinct correct solutions
per problem, token entropy, the share of high-entropy tokens and the forward KL on the teacher's high-entropy tokens;
writes training curves and pass@k plots (PNG) and every number (results.json) into --output-dir."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="Distillation steps per run (default 200; quick 6).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="Seeds; each gives its own warm-started student (default 0 1 2; quick 0 1).")
    parser.add_argument("--output-dir", default="eopd-demo", help="Where to write results.json and the PNGs.")
    parser.add_argument("--device", default="cpu", help="Torch device, e.g. cpu or cuda (default cpu).")
    parser.add_argument("--quick", action="store_true",
                        help="A 20-second run of the whole pipeline on fewer problems, seeds and steps (for CI).")
    parser.add_argument("--entropy-threshold", type=float, default=None,
                        help="EOPD's gate in nats (default 0.8, the paper's).")
    parser.add_argument("--reverse-kl-estimator", choices=["analytic", "sampled"], default=None,
                        help="Base term of both methods (default analytic, EOPDConfig's default).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; the numbers go to stdout and to `<output-dir>/results.json`. Returns the exit status."""
    args = build_parser(prog="trl-eopd demo").parse_args(argv)

    import torch

    from .._quiet import tell_deepspeed_when_cpu_only

    tell_deepspeed_when_cpu_only()
    from transformers.utils import logging as hf_logging

    from .experiment import DemoSettings, format_table, run_demo
    overrides = {"steps": args.steps, "seeds": args.seeds, "device": args.device,
                 "entropy_threshold": args.entropy_threshold, "reverse_kl_estimator": args.reverse_kl_estimator}
    if args.quick:
        settings = DemoSettings.quick_settings(**overrides)
    else:
        settings = DemoSettings(**{k: v for k, v in overrides.items() if v is not None})

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
    print(f"EOPD demo: {settings.steps} distillation steps x batch {settings.batch_size}, seeds {settings.seeds}, "
          f"{settings.num_eval_problems} held-out problems x {settings.num_eval_samples} samples, "
          f"threshold {settings.entropy_threshold} nats, base term {settings.reverse_kl_estimator!r}")
    print("mean ± std over seeds; hiH own / hiH tchr: share of the model's rollout tokens where its own / the "
          "teacher's entropy exceeds the threshold; fKL hiH: forward KL on the teacher's high-entropy tokens")
    print(format_table(results["summary"]))
    print(f"\nWrote {output_dir / 'results.json'}, {output_dir / 'training_curves.png'}, "
          f"{output_dir / 'pass_at_k.png'} in {time.time() - start:.0f}s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
