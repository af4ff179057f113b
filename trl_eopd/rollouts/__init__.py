"""Where the trainer's on-policy completions come from: one [`RolloutSource`] per trainer, called once per window.

- `generate`: the trainer's own model and `generate` (`use_vllm=False`);
- `colocate`: a vLLM engine inside every training process (`vllm_mode="colocate"`).
"""

from __future__ import annotations

from .base import (
    MISMATCH_METRIC,
    SAMPLER_LOGPROBS,
    RolloutSource,
    build_rollout_batch,
    sampler_logprobs_per_loss_token,
    without_rewritten_tokens,
)


def build_rollout_source(trainer) -> RolloutSource:
    """The source `trainer.args` asks for: `generate` without vLLM, else the engine of `args.vllm_mode`."""
    args = trainer.args
    if not args.use_vllm:
        from .generate import GenerateRollouts

        return GenerateRollouts(trainer)
    from .colocate import VLLMRollouts

    return VLLMRollouts(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        args=args,
        eos_token_id=trainer.generation_config.eos_token_id,
        train_dataset=trainer.train_dataset,
        collator_max_length=getattr(trainer.data_collator, "max_length", None),
    )


__all__ = [
    "MISMATCH_METRIC",
    "SAMPLER_LOGPROBS",
    "RolloutSource",
    "build_rollout_batch",
    "build_rollout_source",
    "sampler_logprobs_per_loss_token",
    "without_rewritten_tokens",
]
