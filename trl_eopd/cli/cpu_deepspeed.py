"""What `accelerate launch` with a DeepSpeed config needs on a machine without GPUs, decided before parsing.

Internal to `trl-eopd train`: the gloo process group DeepSpeed's CPU backend uses, and a one-line error when the
accelerate config asks for GPU mixed precision that the recipe turned off.
"""

from __future__ import annotations

import os

from .errors import UsageError


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def needs_gloo(argv: list[str], recipe: dict) -> bool:
    """Whether this is a DeepSpeed launch on a machine without accelerators and no process-group backend was chosen.

    accelerate's DeepSpeed path only picks a backend for accelerator devices. On a CPU-only machine it leaves none,
    and every process then believes it is alone (world size 1) while DeepSpeed sees them all, which breaks its batch
    size check and silently feeds every rank the same data. DeepSpeed's own CPU backend is gloo. The training
    arguments set up the process group while they are parsed, so the default has to be injected before parsing.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or "LOCAL_RANK" not in os.environ:
        return False
    if "ddp_backend" in recipe or any(a.split("=", 1)[0] in ("--ddp_backend", "--ddp-backend") for a in argv):
        return False
    return not has_accelerator()


def check_launcher_precision(training_args) -> None:
    """Stop with one line when `accelerate launch` asked DeepSpeed for mixed precision that the recipe turned off.

    The packaged accelerate configs say `mixed_precision: bf16` (GPU training), and a CPU recipe says `bf16: false`;
    left alone, transformers finds the mismatch only after both models are built and every rank prints a traceback.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed in ("bf16", "fp16") and not getattr(training_args, mixed):
        raise UsageError(
            f"the accelerate config asks DeepSpeed for {mixed} mixed precision but the training arguments have "
            f"`{mixed}: false`. Pass `--mixed_precision no` to `accelerate launch` (as on CPU), or set "
            f"`{mixed}: true` in the recipe."
        )
