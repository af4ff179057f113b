"""Find a causal LM's backbone and output projection, so the loss can project hidden states itself.

The memory-efficient loss never asks the model for logits: it runs the backbone, then projects only the loss positions
through the `lm_head`, a chunk at a time. That is exact only when the model's logits really are
`softcap(scale * (hidden @ W.T + b))`. This module reads that recipe off the model, or says why it can't.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers.trainer_utils import unwrap_peft_model
from trl.trainer.utils import maybe_gather_lm_head_ctx


@dataclass
class OutputProjection:
    """How a model turns its last hidden state into logits: `softcap(logit_scale * (hidden @ weight.T + bias))`."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None


def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack under the LM head, i.e. the module whose output is the last (normalised) hidden state."""
    backbone = getattr(causal_lm, "base_model", None)
    if backbone is None or backbone is causal_lm:
        backbone = getattr(causal_lm, "model", None)
    if backbone is None or backbone is causal_lm:
        raise ValueError(f"Could not find the backbone of {type(causal_lm).__name__}.")
    return backbone


def _logit_scale(config) -> float:
    # Families that rescale logits after the head put the factor under different names; a missing or None value
    # means "unscaled". Granite and MiniCPM divide by `logits_scaling`; HyperCLOVA X multiplies by it.
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    logits_scaling = getattr(config, "logits_scaling", None)
    if logits_scaling is not None:
        return (
            float(logits_scaling)
            if getattr(config, "model_type", "") == "hyperclovax"
            else 1.0 / float(logits_scaling)
        )
    return 1.0


def find_output_projection(causal_lm: nn.Module) -> tuple[OutputProjection | None, str]:
    """Return the model's output projection, or `(None, reason)` when it is not a plain linear layer."""
    # PEFT keeps its adapters injected in the wrapped model's layers, so the bare transformers model computes the same.
    causal_lm = unwrap_peft_model(causal_lm)
    get_output_embeddings = getattr(causal_lm, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if head is None:
        return None, f"{type(causal_lm).__name__} has no output embeddings (`get_output_embeddings()` is None)"
    if type(head) is not nn.Linear:
        # A PEFT adapter on the head, a quantised layer or a custom head computes more than `h @ W.T + b`.
        return None, f"it is a {type(head).__name__}, not a plain torch.nn.Linear"
    try:
        backbone_of(causal_lm)
    except ValueError as error:
        return None, str(error)
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return (
        OutputProjection(
            weight=head.weight,
            bias=head.bias,
            logit_scale=_logit_scale(config),
            softcap=float(softcap) if softcap else None,
        ),
        "",
    )


def is_fsdp2_sharded(model: torch.nn.Module) -> bool:
    """Whether any part of `model` is sharded by FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def gathered(projection: OutputProjection) -> OutputProjection:
    """The projection with FSDP2-sharded (`DTensor`) weight and bias turned into full tensors; others pass as they are.

    Under FSDP2 an output layer read outside its model's forward (the teacher's, after its forward resharded it) is a
    `DTensor`, which cannot meet the plain hidden states. Called once per loss call, so that every chunk reads the
    same full tensor: one all-gather in the forward and one reduce-scatter of its gradient in the backward, however
    many chunks there are.
    """
    from torch.distributed.tensor import DTensor

    def full(tensor):
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    if not isinstance(projection.weight, DTensor) and not isinstance(projection.bias, DTensor):
        return projection
    return dataclasses.replace(projection, weight=full(projection.weight), bias=full(projection.bias))


def project(hidden: torch.Tensor, projection: OutputProjection) -> torch.Tensor:
    """Full logits from hidden states; used only for the one-off consistency check, never in the training loss."""
    logits = nn.functional.linear(
        hidden,
        projection.weight.to(hidden.dtype),
        None if projection.bias is None else projection.bias.to(hidden.dtype),
    )
    logits = logits * projection.logit_scale
    if projection.softcap is not None:
        logits = projection.softcap * torch.tanh(logits / projection.softcap)
    return logits


def last_hidden_state(causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last (normalised) hidden state: what the output projection turns into logits."""
    backbone = backbone_of(unwrap_peft_model(causal_lm))
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def count_non_finite_rows(hidden: torch.Tensor, projection: OutputProjection, chunk_size: int = 256) -> int:
    """Rows of `hidden` whose projected logits hold a NaN or an infinity, a chunk of rows at a time."""
    count = 0
    projection = gathered(projection)
    with torch.no_grad(), maybe_gather_lm_head_ctx(projection.weight, projection.bias):
        for start in range(0, hidden.size(0), chunk_size):
            logits = project(hidden[start : start + chunk_size].float(), projection)
            count += (~torch.isfinite(logits)).any(-1).sum().item()
    return count
