"""An optional vLLM plugin: a server hosting an EOPD teacher also returns the teacher's exact entropy per position.

EOPD's gate (arXiv 2603.07079) switches on where the teacher's entropy exceeds a threshold. A stock vLLM server returns
only the top-K log-probabilities, so the client has to estimate that entropy (`trl_eopd/loss/served.py`). With this
plugin selected, every prompt position of a `/v1/completions` answer with `prompt_logprobs` holds one more entry, under
the reserved token id `ENTROPY_TOKEN_ID` (-1): its `logprob` is the entropy in nats of the full-vocabulary float32
log-softmax that vLLM computes for that position anyway, and its rank comes after the K real entries, so a client that
keeps the top-K by rank never sees it. `trl_eopd.teacher_server.TeacherServer` finds it with its start-up probe and
then gates on the exact entropy.

It is loaded by vLLM from the `vllm.general_plugins` entry point `trl_eopd_teacher_entropy` (in every vLLM process),
and patches only when `VLLM_PLUGINS` names it: vLLM loads every installed general plugin when `VLLM_PLUGINS` is unset,
and an extra entry in every prompt-logprobs answer must not reach engines that did not ask for it (a colocated rollout
engine in the trainer's own environment). `python -m trl_eopd.vllm_plugin.serve ...` starts a server with it
selected, installed or not. This module imports nothing but the standard library until vLLM calls `register`.
"""

from __future__ import annotations

import os

PLUGIN_NAME = "trl_eopd_teacher_entropy"
# The pseudo token id of the entropy entry: no vocabulary has a negative id, and it fits vLLM's int32 id tensors.
ENTROPY_TOKEN_ID = -1
ENTROPY_TOKEN_TEXT = "<trl_eopd:teacher_entropy>"


def selected(environ=os.environ) -> bool:
    """Whether `VLLM_PLUGINS` names this plugin (vLLM's own selection: a comma-separated list of names)."""
    names = environ.get("VLLM_PLUGINS")
    return names is not None and PLUGIN_NAME in (name.strip() for name in names.split(","))


def register() -> None:
    """vLLM's entry point: patch the prompt log-probabilities path if the plugin is selected (idempotent)."""
    from vllm.logger import init_logger

    logger = init_logger(f"vllm.plugins.{PLUGIN_NAME}")  # under "vllm", so that vLLM's log handler prints it
    if not selected():
        logger.debug(
            "%s is installed but not selected: set VLLM_PLUGINS to include it for a teacher server.", PLUGIN_NAME
        )
        return
    from .patches import apply

    apply(logger)
