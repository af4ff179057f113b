"""Truncated importance weights for tokens sampled by an older student (asynchronous rollouts).

The sampled reverse-KL term estimates KL(q || p) at a position from one token y drawn from the current student q. A
token drawn from the sampler's weights q_old (k optimizer steps behind) estimates it with the weight q(y) / q_old(y);
truncating it at a cap C keeps the variance bounded (truncated importance sampling) at the cost of a small bias where
the ratio exceeds C. The weight is a constant of the gradient (detached), so the gradient is
`min(q(y) / q_old(y), C) * (log q(y) - log p(y)) * grad log q(y)`.

The analytic reverse KL, the generalized JSD and the forward KL (full or top-k) are sums over the whole vocabulary at a
position, exact whatever token was sampled there: they need no weight. All terms share the same shift of the prefixes
towards q_old, which per-token ratios do not correct (neither do TRL's or verl's truncated importance sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImportanceCorrection:
    """The sampler's log-probability of each loss token, `(N,)` in the loss's order (NaN where unknown: weight 1),
    and the cap C of the ratio."""

    sampler_log_probs: Tensor
    cap: float

    def ratios(self, current_log_probs: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """`min(exp(current - sampler), cap)` for loss tokens `start:end`, detached, float32."""
        sampler = self.sampler_log_probs[start:end].to(device=current_log_probs.device, dtype=torch.float32)
        if sampler.numel() != current_log_probs.numel():
            raise ValueError(
                f"{sampler.numel()} sampler log-probs for {current_log_probs.numel()} loss tokens: the batch's labels "
                "changed after the rollout."
            )
        ratio = torch.exp(current_log_probs.detach().float() - sampler).clamp(max=self.cap)
        return torch.where(torch.isnan(sampler), torch.ones_like(ratio), ratio)
