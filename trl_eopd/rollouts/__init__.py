"""Where the trainer's on-policy completions come from: one [`RolloutSource`] per trainer, called once per window.

- `generate`: the trainer's own model and `generate` (`use_vllm=False`);
- `colocate`: a vLLM engine inside every training process (`vllm_mode="colocate"`);
- `server`: the student's own vLLM server (`vllm_mode="server"`), synchronous or, with `max_staleness >= 1`,
  sampling the next windows while the current one trains.
"""

from __future__ import annotations

import os

from .base import (
    MISMATCH_METRIC,
    ROLLOUT_STALENESS,
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
    if args.vllm_mode == "server":
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or args.fsdp:
            # The weight push gathers ZeRO-3 parameters; FSDP2's sharded tensors would be written as one shard each.
            raise ValueError(
                "`vllm_mode='server'` does not push FSDP-sharded weights yet: use `vllm_mode='colocate'` (TRL's "
                "weight sync handles FSDP2) or DeepSpeed ZeRO-3 (recipes/accelerate/zero3.yaml) with server rollouts."
            )
        from .server import ServerRollouts as source_class
    else:
        from .colocate import VLLMRollouts as source_class
    return source_class(
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
    "ROLLOUT_STALENESS",
    "SAMPLER_LOGPROBS",
    "RolloutSource",
    "build_rollout_batch",
    "build_rollout_source",
    "sampler_logprobs_per_loss_token",
    "without_rewritten_tokens",
]
