"""The command line's quiet start: DeepSpeed told what it would otherwise guess and print about, from every rank.

Each known-harmless message of the libraries under EOPD is removed where it is caused, not matched by its text:

- DeepSpeed's "Setting accelerator to CPU ... unable to detect it" log: `tell_deepspeed_when_cpu_only` (in `_compat`,
  also called by the library's entry points) tells it first.
- DeepSpeed's "DeepSpeed ... built successfully" print, and torch's FutureWarnings about the collective names
  DeepSpeed's torch backend uses: `deepspeed_set_up_quietly`, around parsing (where the process group is set up).
- accelerate's gradient accumulation "mismatch" under DeepSpeed, transformers' warnings about the checkpointing names
  TRL toggles around a rollout, and its log about `return_dict_in_generate` next to a generation config: fixed in
  `EOPDTrainer` itself (see `trainer.py` and `_compat.py`), so library users do not get them either.

Everything else any library prints, warns or logs still reaches the user.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

from .._compat import tell_deepspeed_when_cpu_only

__all__ = ["deepspeed_set_up_quietly", "tell_deepspeed_when_cpu_only", "uses_deepspeed"]


def uses_deepspeed(argv: list[str], recipe: dict) -> bool:
    """Whether these training arguments run under DeepSpeed (an `accelerate launch` DeepSpeed config, `deepspeed`)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return True
    return bool(recipe.get("deepspeed")) or any(arg.split("=", 1)[0] == "--deepspeed" for arg in argv)


@contextmanager
def deepspeed_set_up_quietly(active: bool = True):
    """Around the parsing of DeepSpeed training arguments: DeepSpeed's torch backend is built without its success print
    and, once built, calls torch's collectives by their current names. Does nothing when `active` is false."""
    if not active or importlib.util.find_spec("deepspeed") is None:
        yield
        return
    from .. import _compat

    with _compat.deepspeed_shm_op_built_quietly():
        yield
    _compat.deepspeed_collectives_by_current_torch_names()
