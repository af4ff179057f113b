"""Per-batch sums of the EOPD loss's statistics, shared by the loss paths and reduced by the trainer."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class EOPDStats:
    """Sums over the loss tokens of one batch, detached from the graph.

    Sums (not means) are kept so that callers can add them across micro-batches, steps and processes and divide once:
    a mean of per-batch means would weight a short batch's tokens more than a long batch's.

    Fields about the gate (`num_high_entropy`, `forward_kl_high_entropy`) use the loss's `entropy_threshold`, so they
    are 0 when the gate is off (plain OPD). The `*_monitor` fields use `monitor_entropy_threshold`, which does not
    depend on the gate, so that OPD and EOPD runs can be compared by them. `loss_base` and `loss_forward` are the two
    terms exactly as they enter the loss, so that loss * divisor = loss_base + forward_kl_coef * loss_forward.
    """

    num_tokens: torch.Tensor
    num_high_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    student_entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    forward_kl_high_entropy: torch.Tensor
    loss_base: torch.Tensor
    loss_forward: torch.Tensor
    num_teacher_high_entropy_monitor: torch.Tensor
    num_student_high_entropy_monitor: torch.Tensor
    forward_kl_teacher_high_entropy_monitor: torch.Tensor

    def to_tensor(self) -> torch.Tensor:
        """Pack into one float64 vector, so a single collective can reduce every statistic at once."""
        return torch.stack([getattr(self, f.name).detach().to(torch.float64).reshape(()) for f in fields(self)])

    @classmethod
    def from_tensor(cls, packed: torch.Tensor) -> EOPDStats:
        return cls(*packed.unbind(-1))

    def means(self) -> dict[str, float]:
        """Per-token means, named as they are logged (`eopd/...`). Empty batches give 0.0, not NaN."""
        n = max(float(self.num_tokens), 1.0)
        n_high = max(float(self.num_high_entropy), 1.0)
        n_teacher_high = max(float(self.num_teacher_high_entropy_monitor), 1.0)
        return {
            "eopd/teacher_entropy": float(self.teacher_entropy) / n,
            "eopd/student_entropy": float(self.student_entropy) / n,
            "eopd/high_entropy_ratio": float(self.num_high_entropy) / n,
            "eopd/reverse_kl": float(self.reverse_kl) / n,
            "eopd/forward_kl": float(self.forward_kl) / n,
            "eopd/forward_kl_high_entropy": float(self.forward_kl_high_entropy) / n_high,
            "eopd/loss_base": float(self.loss_base) / n,
            "eopd/loss_forward_gated": float(self.loss_forward) / n,
            "eopd/monitor/teacher_high_entropy_ratio": float(self.num_teacher_high_entropy_monitor) / n,
            "eopd/monitor/student_high_entropy_ratio": float(self.num_student_high_entropy_monitor) / n,
            "eopd/monitor/forward_kl_teacher_high_entropy": (
                float(self.forward_kl_teacher_high_entropy_monitor) / n_teacher_high
            ),
        }
