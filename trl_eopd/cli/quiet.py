"""Known-harmless warnings of the libraries under EOPD, silenced only around the calls that raise them.

Each entry names one message, the code that raises it and why it needs no action from a user of `trl-eopd`. Anything
not listed still reaches the user: the filters match these messages only, and only inside `harmless_warnings_silenced`,
which the command-line entry points wrap around training and saving. Library users who build `EOPDTrainer`
themselves see everything, as they would with `GKDTrainer`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager

# (category, regex matched at the start of the message, why it is harmless)
HARMLESS_WARNINGS = [
    (
        FutureWarning,
        r"`(gradient_checkpointing_enable|gradient_checkpointing_disable|is_gradient_checkpointing)` is deprecated",
        "TRL's unwrap_model_for_generation switches activation checkpointing off and on around every rollout through "
        "transformers' old method names; the new ones do the same thing.",
    ),
    (
        FutureWarning,
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        "DeepSpeed ZeRO gathers and scatters parameter shards through these torch names, which still work.",
    ),
]

# (logger name, regex searched in the message, why it is harmless)
HARMLESS_LOG_RECORDS = [
    (
        "accelerate.accelerator",
        r"Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has \d+\. "
        r"Using DeepSpeed's value",
        "Under DeepSpeed, transformers writes the training arguments' gradient accumulation into the DeepSpeed config "
        "and accelerate's plugin starts at 1: the value used is the one the user asked for.",
    ),
    (
        "transformers.generation.utils",
        r"Passing `generation_config` together with generation-related arguments=\(\{'return_dict_in_generate'\}\)",
        "TRL's GKD rollout asks generate() for a dict output next to its generation config; the output is the same.",
    ),
]


# (regex matched against a whole line printed to stdout, why it is harmless)
HARMLESS_PRINTS = [
    (
        r"DeepSpeed deepspeed\.ops\.comm\.deepspeed_shm_comm_op built successfully$",
        "Every rank of a CPU DeepSpeed run prints it when DeepSpeed's shared-memory communication op loads (it was "
        "compiled once, on the machine's first launch); a failed build raises instead.",
    ),
]


class _PrintedLineFilter:
    """Stands in for sys.stdout: forwards whole lines, except those matching a harmless pattern."""

    def __init__(self, stream, patterns):
        self.stream, self.patterns, self.pending = stream, [re.compile(p) for p in patterns], ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not any(p.match(line) for p in self.patterns):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextmanager
def harmless_prints_dropped():
    """Within the block, drop the whole stdout lines listed in `HARMLESS_PRINTS`; everything else is printed."""
    original = sys.stdout
    sys.stdout = _PrintedLineFilter(original, [pattern for pattern, _ in HARMLESS_PRINTS])
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = original


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def tell_deepspeed_when_cpu_only(env=None) -> None:
    """Set `DS_ACCELERATOR=cpu` when torch sees no accelerator, unless the user chose one.

    Anything that imports DeepSpeed (transformers and accelerate do when it is installed) otherwise logs that it is
    "setting accelerator to CPU" because it "was unable to detect" a GPU, in every process. This says the same thing
    up front, which DeepSpeed accepts silently; `env` is the environment to update (default: this process's).
    """
    import torch

    env = os.environ if env is None else env
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not has_accelerator:
        env.setdefault("DS_ACCELERATOR", "cpu")


@contextmanager
def harmless_warnings_silenced():
    """Within the block, drop exactly the messages listed above; every other warning and log record passes."""
    installed = []
    with warnings.catch_warnings():
        for category, pattern, _ in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        for name, pattern, _ in HARMLESS_LOG_RECORDS:
            logger, record_filter = logging.getLogger(name), _DropMatching(pattern)
            logger.addFilter(record_filter)
            installed.append((logger, record_filter))
        try:
            yield
        finally:
            for logger, record_filter in installed:
                logger.removeFilter(record_filter)
