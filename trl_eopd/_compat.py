"""Every private name of TRL, transformers, argparse and vLLM that trl-eopd relies on, and nothing else.

Each entry says what it relies on and why no public API does the job. `tests/test_compat.py` checks every assumption
against the installed libraries and fails naming the entry, so that moving the `trl<1.17` pin (or upgrading
transformers or vLLM) shows at once which of these needs work. The vLLM entries are checked in the vLLM environment
(`tests/vllm_engine/test_compat_vllm.py`).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

# ---------------------------------------------------------------------------------------------------------------------
# TRL: running a function inside a wrapped model's forward (`trl.models.utils._ForwardRedirection`)
#
# The chunked loss projects hidden states with the output layer's weight instead of calling the model; it must run
# inside the DDP / DeepSpeed wrapper's forward so that DDP arms its gradient hooks and ZeRO-3 gathers the parameters.
# TRL's DistillationTrainer does the same with this helper; no public API reroutes a call through a wrapper's forward.


def forward_redirection():
    """A callable `(wrapper, unwrapped, method, *args, **kwargs)` running `method(*args, **kwargs)` inside
    `wrapper`'s forward."""
    from trl.models.utils import _ForwardRedirection

    return _ForwardRedirection()


# ---------------------------------------------------------------------------------------------------------------------
# TRL: GKDTrainer's training step without its rollout (`super(GKDTrainer, self).training_step`)
#
# `GKDTrainer.training_step` samples completions and then runs its parent's step. EOPDTrainer samples the whole
# accumulation window earlier (in `get_batch_samples`, so the token count covers the sampled completions), so it must
# run the parent's step without GKD's second rollout. GKD offers no switch for that.


def training_step_without_gkd_rollout(trainer, model, inputs, num_items_in_batch):
    from trl.experimental.gkd import GKDTrainer

    return super(GKDTrainer, trainer).training_step(model, inputs, num_items_in_batch)


# ---------------------------------------------------------------------------------------------------------------------
# transformers: restoring a checkpoint's random state before the first rollout (`Trainer._load_rng_state`)
#
# On resume, transformers restores the random state after `get_batch_samples` returns, but EOPD's rollouts happen
# inside it and are the first to draw. The mixin restores the state there instead and skips transformers' later
# restore, so that a resumed run samples what an uninterrupted run would have.


class RestoresRngBeforeRollouts:
    """Mixin for a `Trainer` subclass: call `_restore_rng_before_rollouts()` where the first random draw happens."""

    _rng_checkpoint_to_restore = None
    _rng_already_restored = False

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            from transformers.trainer_utils import get_last_checkpoint

            # transformers resolves `True` the same way (and reports a missing checkpoint itself).
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        self._rng_checkpoint_to_restore = checkpoint
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._rng_checkpoint_to_restore = None
            self._rng_already_restored = False

    def _restore_rng_before_rollouts(self) -> None:
        if self._rng_checkpoint_to_restore is None:
            return
        super()._load_rng_state(self._rng_checkpoint_to_restore)
        self._rng_checkpoint_to_restore = None
        self._rng_already_restored = True

    def _load_rng_state(self, checkpoint):
        if self._rng_already_restored:
            self._rng_already_restored = False
            return
        super()._load_rng_state(checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# TRL: GKDTrainer's advice to migrate to DistillationTrainer (a log record matched by its text)
#
# GKDTrainer logs it whenever lmbda=1 and temperature=1, EOPD's defaults. DistillationTrainer has no entropy gate, so
# following the advice would silently drop EOPD. Only that record is dropped, only while GKDTrainer is built.

GKD_LOGGER = "trl.experimental.gkd.gkd_trainer"
MIGRATION_ADVICE_MARKER = "DistillationTrainer"


class _DropMigrationAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return MIGRATION_ADVICE_MARKER not in record.getMessage()


@contextmanager
def without_gkd_migration_advice():
    target = logging.getLogger(GKD_LOGGER)
    log_filter = _DropMigrationAdvice()
    target.addFilter(log_filter)
    try:
        yield
    finally:
        target.removeFilter(log_filter)


# ---------------------------------------------------------------------------------------------------------------------
# transformers: chat-template variables fixed inside the template (a Jinja `set` prefix)
#
# GKD's collator (and vLLM, and evaluation) render the chat template without extra variables, so a variable such as
# Qwen3's `enable_thinking` has to live in the template; a top-level `set` wins over the (absent) render-time value,
# and the saved tokenizer keeps it. This relies on transformers rendering the template string as one Jinja template.


def fix_chat_template_variables(tokenizer, variables: dict) -> None:
    prefix = "".join(f"{{%- set {key} = {json.dumps(value)} %}}" for key, value in variables.items())
    tokenizer.chat_template = prefix + tokenizer.chat_template


# ---------------------------------------------------------------------------------------------------------------------
# argparse: help sections in EOPD's order (`_actions`, `_action_groups`, `_group_actions`)
#
# HfArgumentParser lists fields in dataclass order, which puts EOPD's few fields after the hundreds inherited from
# TrainingArguments; argparse has no public way to move an action into another group.


def regroup_help(parser, sections: list[tuple[str, set[str] | None]]) -> None:
    """Move every option into the first section naming its destination (`None`: the rest), sections after `options`."""
    import argparse

    groups = [(parser.add_argument_group(title), members) for title, members in sections]
    for action in list(parser._actions):
        if action.dest in (argparse.SUPPRESS, "help") or not action.option_strings:
            continue
        target = next(group for group, members in groups if members is None or action.dest in members)
        for container in parser._action_groups:
            if action in container._group_actions and container is not target:
                container._group_actions.remove(action)
        target._group_actions.append(action)
    # argparse prints groups in creation order: put the new ones right after the `options` group holding --help.
    new_groups = [group for group, _ in groups]
    rest = [g for g in parser._action_groups if g not in new_groups]
    parser._action_groups[:] = rest + new_groups


# ---------------------------------------------------------------------------------------------------------------------
# vLLM (CPU build): linear layers kept on their plain weights
# (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`)
#
# On CPU, vLLM picks a kernel for every linear layer once its weights are loaded. Each kernel but plain `F.linear`
# repacks the weight into a private copy: the "sgl-kernel" path (`check_cpu_sgl_kernel`, taken first on CPUs with AMX
# for bfloat16/float16 weights up to 1 MiB), zentorch (on the Zen CPU platform) and oneDNN
# (`vllm._custom_ops._supports_onednn`). A linear layer then swaps its weight for an empty Parameter without
# `weight_loader`, so TRL's weight sync fails with "'Parameter' object has no attribute 'weight_loader'"; the output
# layer keeps its weight but would go on computing with the packed copy of the old one. Switching off one path is not
# enough (oneDNN alone was, until this ran on an AMX machine), so every two-dimensional weight is sent to the
# dispatcher's plain `F.linear` fallback, whatever paths a vLLM version adds. vLLM imports the dispatcher from its
# module at each call, so replacing the module attribute reaches every layer built afterwards. The dispatcher's other
# path (packing the 3-D conv weights of hybrid Mamba/GDN models) is left alone: it keeps the parameter and its
# loader. GPU engines never take this path.

VLLM_CPU_GEMM_MODULE = "vllm.model_executor.layers.utils"
VLLM_CPU_GEMM_DISPATCHER = "dispatch_cpu_unquantized_gemm"


def _plain_cpu_linear(x, weight, bias):
    import torch

    return torch.nn.functional.linear(x, weight, bias)


def disable_vllm_cpu_weight_repacking() -> None:
    """Make vLLM's CPU linear layers compute with their own, loadable weights (idempotent)."""
    import importlib

    module = importlib.import_module(VLLM_CPU_GEMM_MODULE)
    original = getattr(module, VLLM_CPU_GEMM_DISPATCHER)
    if getattr(original, "_trl_eopd_plain", False):
        return

    def dispatch_plain(layer, remove_weight):
        if layer.weight.ndim != 2:
            return original(layer, remove_weight)
        # vLLM's `cpu_unquantized_gemm` calls `layer.cpu_linear(x, layer.weight, bias)` at every forward.
        layer.cpu_linear = _plain_cpu_linear

    dispatch_plain._trl_eopd_plain = True
    dispatch_plain.__wrapped__ = original
    setattr(module, VLLM_CPU_GEMM_DISPATCHER, dispatch_plain)


# ---------------------------------------------------------------------------------------------------------------------
# vLLM: shutting a colocated engine down (`LLM.llm_engine.engine_core.shutdown`)
#
# A colocated engine joins the training processes' torch.distributed world and makes its own groups in it. vLLM tears
# them down only when the engine is collected, at interpreter exit in a script; by then `Trainer.end()` has destroyed
# the world, and vLLM's teardown prints "ValueError: Invalid process group specified". `LLM` has no public shutdown in
# vLLM 0.32; its engine-core client's `shutdown()` is the teardown the finalizer runs (it detaches that finalizer, so
# nothing runs twice), and it also destroys the default group, which accelerate then skips.


def shut_down_vllm_engine(llm) -> None:
    """Tear down `llm`'s engine and the process groups it made, now rather than at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()
