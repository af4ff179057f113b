"""`trl-eopd quickstart`: a few EOPD steps on tiny models built locally, to check an install in about 10 seconds.

The models are random, so the numbers only show that every part runs; `trl-eopd demo` is the one that shows EOPD
doing something useful.
"""

from __future__ import annotations

import argparse
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trl-eopd quickstart", description=__doc__)
    parser.add_argument("--steps", type=int, default=4, help="Optimizer steps to run (default: 4).")
    parser.add_argument(
        "--output-dir", default=None, help="Where to write the tiny models and the run (default: temp)."
    )
    parser.add_argument(
        "--full-logits", action="store_true", help="Use the full-logits loss instead of the chunked one."
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    from .quiet import tell_deepspeed_when_cpu_only

    tell_deepspeed_when_cpu_only()
    if args.output_dir is not None:
        trainer = _run(args, args.output_dir)
        saved = f"Saved the student to {args.output_dir}/run/final"
    else:
        # Nothing of a default run is worth keeping (random models): it leaves no folder behind.
        with tempfile.TemporaryDirectory(prefix="trl-eopd-quickstart-") as output_dir:
            trainer = _run(args, output_dir)
        saved = "Ran in a temporary folder, now removed; pass --output-dir DIR to keep the models and the student."

    rows = [log for log in trainer.state.log_history if "loss" in log]
    # loss = loss_base + forward_kl_coef * loss_forward_gated: the first three columns show the loss from its parts.
    keys = [
        "loss",
        "eopd/loss_base",
        "eopd/loss_forward_gated",
        "eopd/teacher_entropy",
        "eopd/student_entropy",
        "eopd/high_entropy_ratio",
        "eopd/reverse_kl",
        "eopd/forward_kl",
    ]
    print("EOPD metrics per step (tiny random models, so values only show the pipeline runs):")
    print(" | ".join(["step"] + [key.removeprefix("eopd/") for key in keys]))
    for row in rows:
        print(" | ".join([str(row["step"])] + [f"{row[key]:.4f}" for key in keys]))
    print(f"\n{saved}")
    return 0


def _run(args, output_dir: str):
    from datasets import load_dataset
    from transformers import AutoTokenizer, PrinterCallback

    from .. import EOPDConfig, EOPDTrainer
    from ..tiny import save_tiny_setup

    paths = save_tiny_setup(f"{output_dir}/tiny")
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    dataset = load_dataset("json", data_files=paths["dataset"], split="train")
    config = EOPDConfig(
        output_dir=f"{output_dir}/run",
        bf16=False,
        per_device_train_batch_size=4,
        max_steps=args.steps,
        logging_steps=1,
        max_new_tokens=24,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        memory_efficient_loss=not args.full_logits,
        # Four steps take a second: the table below says more than a progress bar and per-step dicts would.
        disable_tqdm=True,
    )
    trainer = EOPDTrainer(
        model=paths["student"],
        teacher_model=paths["teacher"],
        args=config,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.evaluate()
    trainer.save_model(f"{output_dir}/run/final")
    return trainer
