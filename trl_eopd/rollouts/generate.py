"""Rollouts with the trainer's own model and `generate` (`use_vllm=False`): GKD's sampling, one micro-batch at once."""

from __future__ import annotations

import copy
import random

import torch

from .. import _compat
from ..loss.projection import is_fsdp2_sharded
from .base import RolloutSource


class GenerateRollouts(RolloutSource):
    """Sample each micro-batch with `generate`: the student's completion with probability `lmbda`, else the teacher's
    when `seq_kd` is set, else the dataset's completion is kept.

    Args:
        trainer ([`EOPDTrainer`]): read for its models, generation settings and GKD's `generate_on_policy_outputs`,
            which runs unchanged so that code calling it on the class keeps working.
    """

    def __init__(self, trainer):
        super().__init__(trainer.accelerator)
        self.trainer = trainer

    def roll_out_window(
        self, batches: list[dict], *, global_step: int, lmbda: float, measure_mismatch: bool
    ) -> list[dict]:
        return [batch for batch in batches if self._roll_out(batch, lmbda, global_step)]

    def _roll_out(self, inputs: dict, lmbda: float, global_step: int) -> bool:
        trainer = self.trainer
        if random.random() <= lmbda:
            generator, gradient_checkpointing_kwargs = (
                trainer.model_wrapped,
                trainer.args.gradient_checkpointing_kwargs,
            )
            role = "student (on-policy sampling)"
        elif trainer.seq_kd:
            generator, gradient_checkpointing_kwargs = trainer.teacher_model, None
            role = "teacher (sampling because seq_kd=True)"
        else:
            return False
        with _compat.unwrap_model_for_generation(
            generator,
            trainer.accelerator,
            generation_kwargs=trainer.generation_kwargs,
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
        ) as unwrapped_model:
            try:
                generation_config = trainer.generation_config
                if _generation_is_synced(unwrapped_model):
                    generation_config = _with_cache(generation_config)
                input_ids, attention_mask, labels = trainer.generate_on_policy_outputs(
                    _compat.GenerationConfigOnly(unwrapped_model), inputs, generation_config
                )
            except RuntimeError as error:
                # torch's sampler reports non-finite probabilities without naming the model; the loss's own check
                # names it, and sampling (the student's, or the teacher's with seq_kd) does too.
                if "probability tensor contains" not in str(error):
                    raise
                raise FloatingPointError(_non_finite_sampling_report(global_step, unwrapped_model, role)) from error
        inputs.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return True


def _non_finite_sampling_report(global_step: int, model, role: str) -> str:
    with torch.no_grad():
        bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        cause = f"{len(bad)} of its weight tensors contain NaN or inf ({listed})"
    else:
        cause = "its weights are finite, so its logits overflowed (fp16 overflows easily; prefer bf16 or fp32)"
    return (
        f"Sampling from the {role} failed at global step {global_step}: its next-token probabilities "
        f"are NaN or inf because {cause}. A NaN loss or a too-high learning rate in an earlier step is the usual "
        "cause; lower the learning rate, or restart from a healthy checkpoint."
    )


def _generation_is_synced(model: torch.nn.Module) -> bool:
    """Whether transformers' `generate` steps every process together (`synced_gpus`), as it does by itself for a
    ZeRO-3 or FSDP-sharded model in a group of several processes: a process whose completions have all ended keeps
    running forward passes until every process's have."""
    import torch.distributed as dist
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return is_deepspeed_zero3_enabled() or is_fsdp2_sharded(model)


def _with_cache(generation_config):
    """A copy of `generation_config` that uses the KV cache.

    GKD turns the cache off when activation checkpointing is on, but TRL's `unwrap_model_for_generation` switches
    checkpointing off while generating anyway. Without the cache, transformers 5's synchronised generation breaks on a
    process whose completions have all ended: it stops extending that process's token ids but keeps extending its
    attention mask, and the next forward fails on their shape mismatch.
    """
    if generation_config.use_cache:
        return generation_config
    generation_config = copy.deepcopy(generation_config)
    generation_config.use_cache = True
    return generation_config
