"""Entropy-aware on-policy distillation loss on full logits.

This module is pure: it holds no trainer state and can be used on any pair of already-shifted logits. The formula is
the paper's (Entropy-Aware On-Policy Distillation, arXiv 2603.07079), written out in the README's "How EOPD works"
section: a base divergence on every loss token plus a forward KL on the tokens where the teacher's entropy exceeds a
threshold. The options and their defaults are [`EOPDLossOptions`]'s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .importance import ImportanceCorrection
from .options import IGNORE_INDEX, EOPDLossOptions
from .stats import EOPDStats


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
    options: EOPDLossOptions | None = None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    target_log_probs_out: torch.Tensor | None = None,
    importance: ImportanceCorrection | None = None,
    **option_overrides,
) -> tuple[torch.Tensor, EOPDStats]:
    """Like [`eopd_loss`], and also returns the detached [`EOPDStats`] of the batch, computed from the same logits.

    `monitor_entropy_threshold` (nats) only affects the statistics: the `*_monitor` fields count and measure the tokens
    whose entropy is above it, whatever the gate. `target_log_probs_out`, if given, is a float32 tensor of shape
    `(num_loss_tokens,)` that receives the student's tempered log-probability of each label, detached, in the order of
    `labels[labels != -100]` (a sampler's log-probabilities can be compared with it at no extra forward pass).
    `importance`, for tokens sampled by older weights, weights the sampled reverse-KL term of each token by its
    truncated importance ratio (see `trl_eopd/loss/importance.py`); other base terms need none and ignore it.
    """
    opts = EOPDLossOptions.resolve(options, option_overrides)
    entropy_threshold, forward_kl_coef, gate = opts.entropy_threshold, opts.forward_kl_coef, opts.gate
    beta, temperature, forward_kl_top_k = opts.beta, opts.temperature, opts.forward_kl_top_k
    reverse_kl_estimator, monitor_entropy_threshold = opts.reverse_kl_estimator, opts.monitor_entropy_threshold
    _check_inputs(student_logits, teacher_logits, labels)

    # Only loss positions are upcast and normalised: prompt and padding rows never become float32 vocab-sized copies.
    loss_mask = labels != IGNORE_INDEX
    scaled_student = student_logits[loss_mask].float() / temperature
    scaled_teacher = teacher_logits[loss_mask].float() / temperature
    targets = labels[loss_mask]

    # logits - logsumexp, not F.log_softmax: see `log_softmax_into` (float32 CPU log_softmax drifts at ~150k tokens).
    student_log_probs = scaled_student - scaled_student.logsumexp(-1, keepdim=True)
    teacher_log_probs = scaled_teacher - scaled_teacher.logsumexp(-1, keepdim=True)
    if target_log_probs_out is not None:
        target_log_probs_out.copy_(student_log_probs.detach().gather(-1, targets.unsqueeze(-1)).squeeze(-1))

    with torch.no_grad():
        teacher_entropy = -(teacher_log_probs.exp() * teacher_log_probs).sum(-1)
        high_entropy = teacher_entropy > entropy_threshold

    if reverse_kl_estimator == "sampled":
        student_target_log_probs = student_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        base = sampled_reverse_kl_per_token(
            student_target_log_probs, teacher_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        )
        if importance is not None:
            base = base * importance.ratios(student_target_log_probs)
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
    options: EOPDLossOptions | None = None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    **option_overrides,
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
        options ([`EOPDLossOptions`], *optional*):
            The loss options; defaults to `EOPDLossOptions()`, the paper's.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Divisor for the summed loss, e.g. the loss-token count of a whole gradient-accumulation window. 0 (a
            window without any loss token) gives a loss of 0, not NaN.
        **option_overrides:
            Any field of [`EOPDLossOptions`] by name (e.g. `entropy_threshold=1.0`), replacing its value in `options`.

    Returns:
        `torch.Tensor`: the scalar loss. A batch with no loss token gives 0 with a gradient path.
    """
    loss, _ = eopd_loss_and_stats(
        student_logits, teacher_logits, labels, options, num_items_in_batch=num_items_in_batch, **option_overrides
    )
    return loss
