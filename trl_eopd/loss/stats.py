"""Per-batch sums of the EOPD loss's statistics, shared by the loss paths and reduced by the trainer, and what
evaluation reports from them."""

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


# With a served teacher the base term is the sampled estimate log q(y) - log p(y): valid only on the student's own
# samples. Evaluation scores the dataset's completions, where its value estimates no KL (it is often negative), so
# evaluation leaves it out, with the two loss terms that the evaluation loss is then no longer made of.
SERVED_METRICS_NOT_EVALUATED = ("eopd/reverse_kl_sampled", "eopd/loss_base", "eopd/loss_forward_gated")


def _is_served(stats) -> bool:
    from .served import ServedTeacherStats

    if isinstance(stats, ServedTeacherStats):
        return True
    if isinstance(stats, EOPDStats):
        return False
    raise TypeError(f"Expected `EOPDStats` or `ServedTeacherStats`; got {type(stats).__name__}.")


def evaluation_loss_sum(stats, forward_kl_coef: float) -> torch.Tensor:
    """The evaluation loss summed over the tokens of `stats` (an [`EOPDStats`] or a `ServedTeacherStats`).

    With a local teacher it is the loss's own sum, `loss_base + forward_kl_coef * loss_forward`: evaluation computes
    the base term with the analytic reverse KL whatever `reverse_kl_estimator` (`EOPDTrainer._loss_options_for`). With
    a served teacher, whose full distribution is out of reach, it is the top-k forward KL over every token.
    """
    if _is_served(stats):
        return stats.forward_kl_top_k
    return stats.loss_base + forward_kl_coef * stats.loss_forward


def evaluation_means(stats, forward_kl_coef: float) -> tuple[float, dict[str, float]]:
    """`(loss, metrics)` of an evaluation from the sums of its whole pass: per-token means, as evaluation logs them.

    The loss is [`evaluation_loss_sum`] over the number of tokens, so it equals its `eopd/*` parts whatever the
    evaluation batch size; with a served teacher the metrics leave out `SERVED_METRICS_NOT_EVALUATED`.
    """
    means = stats.means()
    if _is_served(stats):
        # Also each served teacher's own (`eopd/teacher/<id>/loss_base`, ...) with several teachers.
        not_evaluated = {name.rsplit("/", 1)[1] for name in SERVED_METRICS_NOT_EVALUATED}
        for name in [name for name in means if name.rsplit("/", 1)[1] in not_evaluated]:
            means.pop(name)
    loss = float(evaluation_loss_sum(stats, forward_kl_coef)) / max(float(stats.num_tokens), 1.0)
    return loss, means
