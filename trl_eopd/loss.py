"""Entropy-aware on-policy distillation loss on full logits.

This module is pure: it holds no trainer state and can be used on any pair of already-shifted logits. The formula is
the paper's (Entropy-Aware On-Policy Distillation, arXiv 2603.07079), written out in the README's "How EOPD works"
section: a base divergence on every loss token plus a forward KL on the tokens where the teacher's entropy exceeds a
threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
GATES = ("augment", "switch")
REVERSE_KL_ESTIMATORS = ("analytic", "sampled")


def validate_eopd_options(
    *,
    entropy_threshold: float,
    forward_kl_coef: float,
    gate: str,
    beta: float,
    temperature: float,
    forward_kl_top_k: int | None,
    reverse_kl_estimator: str,
    lmbda: float | None = None,
    seq_kd: bool | None = None,
    monitor_entropy_threshold: float | None = None,
) -> None:
    """Raise a `ValueError` naming the field and the allowed values for the first invalid EOPD option.

    `lmbda` and `seq_kd` only matter to the trainer (they decide where the tokens come from), so the pure loss leaves
    them out; the config passes them so that the "sampled" estimator is only accepted on purely on-policy data.
    """
    if not isinstance(entropy_threshold, Real) or math.isnan(entropy_threshold) or entropy_threshold < 0:
        raise ValueError(
            f"`entropy_threshold` must be a number >= 0 in nats, or float('inf') to switch the gate off (plain OPD); "
            f"got {entropy_threshold!r}."
        )
    if not isinstance(forward_kl_coef, Real) or not math.isfinite(forward_kl_coef) or forward_kl_coef < 0:
        raise ValueError(f"`forward_kl_coef` must be a finite number >= 0; got {forward_kl_coef!r}.")
    if gate not in GATES:
        raise ValueError(f"`gate` must be one of {GATES}; got {gate!r}.")
    if not isinstance(beta, Real) or math.isnan(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0.0, 1.0] (1.0 is reverse KL, 0.0 forward KL); got {beta!r}.")
    if not isinstance(temperature, Real) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` must be a finite number > 0; got {temperature!r}.")
    if forward_kl_top_k is not None and (
        isinstance(forward_kl_top_k, bool) or not isinstance(forward_kl_top_k, Integral) or forward_kl_top_k < 1
    ):
        raise ValueError(
            f"`forward_kl_top_k` must be None (full vocabulary) or an integer >= 1; got {forward_kl_top_k!r}."
        )
    if monitor_entropy_threshold is not None and (
        not isinstance(monitor_entropy_threshold, Real)
        or isinstance(monitor_entropy_threshold, bool)
        or not math.isfinite(monitor_entropy_threshold)
        or monitor_entropy_threshold < 0
    ):
        raise ValueError(
            f"`monitor_entropy_threshold` must be a finite number >= 0 in nats (the paper's analyses use 0.8); got "
            f"{monitor_entropy_threshold!r}."
        )
    if reverse_kl_estimator not in REVERSE_KL_ESTIMATORS:
        raise ValueError(f"`reverse_kl_estimator` must be one of {REVERSE_KL_ESTIMATORS}; got {reverse_kl_estimator!r}.")
    if reverse_kl_estimator == "sampled":
        # The sampled estimator is a policy gradient: it is only unbiased on tokens the student itself sampled.
        problems = []
        if beta != 1.0:
            problems.append(f"`beta=1.0` (got {beta!r})")
        if lmbda is not None and lmbda != 1.0:
            problems.append(f"`lmbda=1.0` (got {lmbda!r})")
        if seq_kd:
            problems.append("`seq_kd=False` (got True)")
        if problems:
            raise ValueError(
                "`reverse_kl_estimator='sampled'` is a policy-gradient estimate that is only valid on the student's "
                "own samples, so it requires " + ", ".join(problems) + ". Use `reverse_kl_estimator='analytic'` "
                "otherwise."
            )


DEFAULT_MONITOR_ENTROPY_THRESHOLD = 0.8


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


def generalized_jsd_per_token(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float):
    """GKD's generalized Jensen-Shannon divergence per token, summed over the last (vocabulary) dimension.

    beta = 1 is the reverse KL(student || teacher), beta = 0 the forward KL(teacher || student); in between, both
    distributions are compared with the mixture m = beta * teacher + (1 - beta) * student.
    """
    student_probs = student_log_probs.exp()
    teacher_probs = teacher_log_probs.exp()
    if beta == 1.0:
        return (student_probs * (student_log_probs - teacher_log_probs)).sum(-1)
    if beta == 0.0:
        return (teacher_probs * (teacher_log_probs - student_log_probs)).sum(-1)
    mixture_log_probs = torch.logaddexp(student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta))
    teacher_to_mixture = (teacher_probs * (teacher_log_probs - mixture_log_probs)).sum(-1)
    student_to_mixture = (student_probs * (student_log_probs - mixture_log_probs)).sum(-1)
    return beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture


def sampled_reverse_kl_per_token(student_token_log_probs: torch.Tensor, teacher_token_log_probs: torch.Tensor):
    """Single-sample reverse-KL estimate whose value is k = log q(y) - log p(y) and whose gradient is k * grad log q(y).

    This is the paper's OPD objective: a policy gradient with advantage log p(y) - log q(y).
    """
    log_ratio = (student_token_log_probs - teacher_token_log_probs).detach()
    return log_ratio * (student_token_log_probs - student_token_log_probs.detach()) + log_ratio


def top_k_forward_kl_per_token(
    student_log_probs: torch.Tensor, scaled_teacher_logits: torch.Tensor, top_k: int
) -> torch.Tensor:
    """KL from the teacher renormalised over its top-k tokens to the student's full-vocabulary distribution."""
    top_k = min(top_k, scaled_teacher_logits.size(-1))
    top_logits, top_ids = scaled_teacher_logits.topk(top_k, dim=-1)
    renormalised_teacher_log_probs = F.log_softmax(top_logits, dim=-1)
    student_log_probs_on_top = student_log_probs.gather(-1, top_ids)
    return (renormalised_teacher_log_probs.exp() * (renormalised_teacher_log_probs - student_log_probs_on_top)).sum(-1)


def safe_divisor(num_items_in_batch: torch.Tensor | int | float, device: torch.device) -> torch.Tensor | float:
    """`num_items_in_batch` as a divisor, with 0 read as 1.

    A count of 0 means the whole accumulation window has no loss token, so every summed loss in it is 0: dividing by 1
    keeps that 0 (with its gradient path) instead of 0 / 0 = NaN. Other values, fractional ones included (a process's
    share of a global count), are used as given.
    """
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(device)
        return torch.where(num_items_in_batch == 0, torch.ones_like(num_items_in_batch), num_items_in_batch)
    if num_items_in_batch < 0 or (isinstance(num_items_in_batch, float) and not math.isfinite(num_items_in_batch)):
        raise ValueError(f"`num_items_in_batch` must be a finite number >= 0; got {num_items_in_batch!r}.")
    return num_items_in_batch if num_items_in_batch != 0 else 1


def _check_inputs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"`student_logits` has shape {tuple(student_logits.shape)} but `teacher_logits` has shape "
            f"{tuple(teacher_logits.shape)}; both must be (batch, seq, vocab) over the same vocabulary and positions."
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)} but the logits have shape {tuple(student_logits.shape)}; "
            f"`labels` must be the logits' shape without the vocabulary dimension, shifted the same way."
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError(
            f"The logits must be floating point; got student {student_logits.dtype} and teacher {teacher_logits.dtype}."
        )


def eopd_loss_and_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    entropy_threshold: float = 0.8,
    forward_kl_coef: float = 1.0,
    gate: str = "augment",
    beta: float = 1.0,
    temperature: float = 1.0,
    forward_kl_top_k: int | None = None,
    reverse_kl_estimator: str = "analytic",
    num_items_in_batch: torch.Tensor | int | None = None,
    monitor_entropy_threshold: float = DEFAULT_MONITOR_ENTROPY_THRESHOLD,
    target_log_probs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, EOPDStats]:
    """Like [`eopd_loss`], and also returns the detached [`EOPDStats`] of the batch, computed from the same logits.

    `monitor_entropy_threshold` (nats) only affects the statistics: the `*_monitor` fields count and measure the tokens
    whose entropy is above it, whatever the gate. `target_log_probs_out`, if given, is a float32 tensor of shape
    `(num_loss_tokens,)` that receives the student's tempered log-probability of each label, detached, in the order of
    `labels[labels != -100]` (a sampler's log-probabilities can be compared with it at no extra forward pass).
    """
    validate_eopd_options(
        entropy_threshold=entropy_threshold,
        forward_kl_coef=forward_kl_coef,
        gate=gate,
        beta=beta,
        temperature=temperature,
        forward_kl_top_k=forward_kl_top_k,
        reverse_kl_estimator=reverse_kl_estimator,
        monitor_entropy_threshold=monitor_entropy_threshold,
    )
    _check_inputs(student_logits, teacher_logits, labels)

    # Only loss positions are upcast and normalised: prompt and padding rows never become float32 vocab-sized copies.
    loss_mask = labels != IGNORE_INDEX
    scaled_student = student_logits[loss_mask].float() / temperature
    scaled_teacher = teacher_logits[loss_mask].float() / temperature
    targets = labels[loss_mask]

    student_log_probs = F.log_softmax(scaled_student, dim=-1)
    teacher_log_probs = F.log_softmax(scaled_teacher, dim=-1)
    if target_log_probs_out is not None:
        target_log_probs_out.copy_(student_log_probs.detach().gather(-1, targets.unsqueeze(-1)).squeeze(-1))

    with torch.no_grad():
        teacher_entropy = -(teacher_log_probs.exp() * teacher_log_probs).sum(-1)
        high_entropy = teacher_entropy > entropy_threshold

    if reverse_kl_estimator == "sampled":
        base = sampled_reverse_kl_per_token(
            student_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
            teacher_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        )
    else:
        base = generalized_jsd_per_token(student_log_probs, teacher_log_probs, beta)

    if forward_kl_top_k is None:
        forward = generalized_jsd_per_token(student_log_probs, teacher_log_probs, 0.0)
    else:
        forward = top_k_forward_kl_per_token(student_log_probs, scaled_teacher, forward_kl_top_k)

    gate_weight = high_entropy.to(base.dtype)
    base_used = base if gate == "augment" else (1.0 - gate_weight) * base
    forward_used = gate_weight * forward
    per_token_loss = base_used + forward_kl_coef * forward_used

    loss_sum = per_token_loss.sum()
    if num_items_in_batch is not None:
        loss = loss_sum / safe_divisor(num_items_in_batch, loss_sum.device)
    else:
        loss = loss_sum / loss_mask.sum().clamp_min(1)

    with torch.no_grad():
        student_entropy = -(student_log_probs.exp() * student_log_probs).sum(-1)
        # The default base term already is the reverse KL; only other settings need another pass over the vocabulary.
        base_is_reverse_kl = reverse_kl_estimator == "analytic" and beta == 1.0
        reverse_kl = (
            base.detach()
            if base_is_reverse_kl
            else generalized_jsd_per_token(student_log_probs, teacher_log_probs, 1.0)
        )
        # The logged forward KL is always over the full vocabulary, whatever the loss's top-k, so runs compare.
        full_forward_kl = (
            forward.detach()
            if forward_kl_top_k is None
            else generalized_jsd_per_token(student_log_probs, teacher_log_probs, 0.0)
        )
        teacher_high_monitor = teacher_entropy > monitor_entropy_threshold
        stats = EOPDStats(
            num_tokens=loss_mask.sum(),
            num_high_entropy=high_entropy.sum(),
            teacher_entropy=teacher_entropy.sum(),
            student_entropy=student_entropy.sum(),
            reverse_kl=reverse_kl.sum(),
            forward_kl=full_forward_kl.sum(),
            forward_kl_high_entropy=(full_forward_kl * gate_weight).sum(),
            loss_base=base_used.detach().sum(),
            loss_forward=forward_used.detach().sum(),
            num_teacher_high_entropy_monitor=teacher_high_monitor.sum(),
            num_student_high_entropy_monitor=(student_entropy > monitor_entropy_threshold).sum(),
            forward_kl_teacher_high_entropy_monitor=(full_forward_kl * teacher_high_monitor).sum(),
        )
    return loss, stats


def eopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    entropy_threshold: float = 0.8,
    forward_kl_coef: float = 1.0,
    gate: str = "augment",
    beta: float = 1.0,
    temperature: float = 1.0,
    forward_kl_top_k: int | None = None,
    reverse_kl_estimator: str = "analytic",
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Entropy-aware on-policy distillation loss.

    Per loss token t, with student q = softmax(S / temperature) and teacher p = softmax(T / temperature):

    - the teacher entropy H_t in nats, and the gate g_t = 1[H_t > entropy_threshold] (no gradient);
    - the base term b_t: GKD's generalized JSD with `beta` (`"analytic"`, beta = 1 is the reverse KL), or the
      sampled reverse-KL policy-gradient estimate on the label token (`"sampled"`, the paper's OPD);
    - the forward term f_t = KL(p || q) over the full vocabulary, or over the teacher's renormalised top-k tokens;
    - l_t = b_t + forward_kl_coef * g_t * f_t (`gate="augment"`), or (1 - g_t) * b_t + forward_kl_coef * g_t * f_t
      (`gate="switch"`).

    The result is sum_t l_t / num_items_in_batch, or the mean over loss tokens when `num_items_in_batch` is None.

    Args:
        student_logits (`torch.Tensor`):
            Student logits of shape `(batch, seq, vocab)`, already shifted so that position t predicts `labels[:, t]`.
            Any float dtype; the loss is computed in float32.
        teacher_logits (`torch.Tensor`):
            Teacher logits, same shape as `student_logits`.
        labels (`torch.Tensor`):
            Token ids of shape `(batch, seq)`, with -100 where no loss is taken.
        entropy_threshold (`float`, *optional*, defaults to `0.8`):
            Teacher entropy (nats) above which the forward KL is applied. `float("inf")` gives plain OPD.
        forward_kl_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the forward KL on gated tokens.
        gate (`str`, *optional*, defaults to `"augment"`):
            `"augment"` adds the forward KL to the base term, `"switch"` replaces the base term with it.
        beta (`float`, *optional*, defaults to `1.0`):
            Generalized-JSD interpolation of the `"analytic"` base term; 1.0 is the reverse KL.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature applied to both models before every divergence and the entropy.
        forward_kl_top_k (`int` or `None`, *optional*, defaults to `None`):
            Restrict the forward KL to the teacher's top-k tokens (the paper used 16). None uses the full vocabulary.
        reverse_kl_estimator (`str`, *optional*, defaults to `"analytic"`):
            `"analytic"` for the exact divergence, `"sampled"` for the paper's sampled policy-gradient estimate.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Divisor for the summed loss, e.g. the loss-token count of a whole gradient-accumulation window. 0 (a
            window without any loss token) gives a loss of 0, not NaN.

    Returns:
        `torch.Tensor`: the scalar loss. A batch with no loss token gives 0 with a gradient path.
    """
    loss, _ = eopd_loss_and_stats(
        student_logits,
        teacher_logits,
        labels,
        entropy_threshold=entropy_threshold,
        forward_kl_coef=forward_kl_coef,
        gate=gate,
        beta=beta,
        temperature=temperature,
        forward_kl_top_k=forward_kl_top_k,
        reverse_kl_estimator=reverse_kl_estimator,
        num_items_in_batch=num_items_in_batch,
    )
    return loss
