"""Memory-efficient EOPD loss that never holds full logits for every position.

The loss is computed from the last hidden states of the loss positions and the two output projections, a chunk of
tokens at a time. For each chunk the forward pass projects both models, computes every per-token term and, when the
student needs gradients, the closed-form gradient of the chunk's loss with respect to the student's logits. That
gradient is pushed through the projection immediately, so the backward pass only rescales gradients that already exist:
nothing is recomputed and no chunk's logits outlive its iteration. Peak memory is therefore a few `(chunk_size, vocab)`
float32 buffers plus the `(vocab, hidden)` weight gradient, whatever the number of tokens.

The values match [`trl_eopd.eopd_loss_and_stats`] on full logits `softcap(scale * (hidden @ weight.T + bias))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .loss import DEFAULT_MONITOR_ENTROPY_THRESHOLD, EOPDStats, validate_eopd_options

# Columns of the per-token statistics table filled chunk by chunk; summing whole columns at the end keeps the
# reduction order close to the full-logits reference.
(
    _TEACHER_ENTROPY,
    _STUDENT_ENTROPY,
    _REVERSE_KL,
    _FORWARD_KL,
    _GATED_FORWARD_KL,
    _HIGH_ENTROPY,
    _LOSS,
    _BASE_USED,
    _FORWARD_USED,
    _TEACHER_HIGH_MONITOR,
    _STUDENT_HIGH_MONITOR,
    _FORWARD_KL_TEACHER_HIGH_MONITOR,
) = range(12)
_NUM_COLUMNS = 12


@dataclass(frozen=True)
class _Options:
    entropy_threshold: float
    forward_kl_coef: float
    gate: str
    beta: float
    temperature: float
    forward_kl_top_k: int | None
    reverse_kl_estimator: str
    monitor_entropy_threshold: float
    student_logit_scale: float
    teacher_logit_scale: float
    student_softcap: float | None
    teacher_softcap: float | None


def _project_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Write `hidden @ weight.T + bias` into the float32 buffer `out` (possibly a strided view)."""
    hidden = hidden.to(weight.dtype)
    if weight.dtype == out.dtype:
        # Writing straight into the reused buffer avoids a fresh vocab-sized allocation (and its page faults) per chunk.
        if bias is None:
            torch.mm(hidden, weight.t(), out=out)
        else:
            torch.addmm(bias.to(out.dtype), hidden, weight.t(), out=out)
    else:
        # Low-precision models produce low-precision logits; project in their dtype (as the model would) and upcast.
        logits = hidden @ weight.t()
        if bias is not None:
            logits += bias.to(logits.dtype)
        out.copy_(logits)


def _scale_into_tempered_logits(
    logits: Tensor, logit_scale: float, softcap: float | None, temperature: float, softcap_derivative: Tensor | None
) -> None:
    """Turn raw projections into `softcap(scale * logits) / temperature` in place.

    When `softcap_derivative` is given, it receives `1 - tanh^2`, the softcap's derivative up to the constant factor
    `logit_scale` that the caller folds into its final gradient scale.
    """
    if softcap is None:
        factor = logit_scale / temperature
        if factor != 1.0:
            logits.mul_(factor)
        return
    logits.mul_(logit_scale / softcap).tanh_()
    if softcap_derivative is not None:
        torch.mul(logits, logits, out=softcap_derivative).neg_().add_(1.0)
    logits.mul_(softcap / temperature)


def _eopd_chunks(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    targets: Tensor,
    opts: _Options,
    divisor: float,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss, per-token statistic sums and (optionally) the loss's gradients w.r.t. the student's hidden, weight, bias.

    Returns `(loss, stat_sums, grad_hidden, grad_weight, grad_bias)`, where `stat_sums` holds the column sums of the
    per-token table (see the `_TEACHER_ENTROPY`... indices) and gradients are None where not requested.
    """
    device = student_hidden.device
    num_tokens, vocab_size = targets.numel(), student_weight.size(0)
    need_hidden, need_weight, need_bias = needs_grad
    need_any = need_hidden or need_weight or need_bias

    per_token = torch.zeros(num_tokens, _NUM_COLUMNS, dtype=torch.float32, device=device)
    grad_hidden = torch.zeros(student_hidden.shape, dtype=torch.float32, device=device) if need_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if need_weight else None
    grad_bias = (
        torch.zeros(student_bias.shape, dtype=torch.float32, device=device)
        if need_bias and student_bias is not None
        else None
    )

    rows = min(chunk_size, num_tokens)
    # Student and teacher share one (rows, 2, vocab) buffer so that a single log-softmax, a single exp and one batched
    # 2x2 matmul (all four dot products per token) serve both models.
    probs_buffer = torch.empty(rows, 2, vocab_size, dtype=torch.float32, device=device)
    log_probs_buffer = torch.empty_like(probs_buffer)
    softcap_derivative_buffer = (
        torch.empty(rows, vocab_size, dtype=torch.float32, device=device)
        if need_any and opts.student_softcap is not None
        else None
    )

    beta, tau, coef = opts.beta, opts.temperature, opts.forward_kl_coef
    sampled = opts.reverse_kl_estimator == "sampled"
    top_k = None if opts.forward_kl_top_k is None else min(opts.forward_kl_top_k, vocab_size)
    mixed_beta = not sampled and 0.0 < beta < 1.0
    # d(loss)/d(projection) = d(loss)/d(tempered logits) * logit_scale / temperature (times the softcap's derivative,
    # elementwise), over the reduction's constant divisor: the scalars are folded into one factor that is applied to
    # the small (chunk, hidden) and (vocab, hidden) results, never to a vocabulary-sized chunk.
    grad_scale = opts.student_logit_scale / tau / divisor

    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        n = end - start
        probs, log_probs = probs_buffer[:n], log_probs_buffer[:n]
        student_logits, teacher_logits = probs[:, 0], probs[:, 1]
        softcap_derivative = None if softcap_derivative_buffer is None else softcap_derivative_buffer[:n]

        _project_into(student_logits, student_hidden[start:end], student_weight, student_bias)
        _project_into(teacher_logits, teacher_hidden[start:end], teacher_weight, teacher_bias)
        _scale_into_tempered_logits(
            student_logits, opts.student_logit_scale, opts.student_softcap, tau, softcap_derivative
        )
        _scale_into_tempered_logits(teacher_logits, opts.teacher_logit_scale, opts.teacher_softcap, tau, None)

        torch.log_softmax(probs, dim=-1, out=log_probs)
        student_log_probs, teacher_log_probs = log_probs[:, 0], log_probs[:, 1]

        # Everything that needs log q itself is read before log q is overwritten by log q - log p below.
        if top_k is not None:
            top_teacher_log_probs, top_ids = teacher_log_probs.topk(top_k, dim=-1)
            renormalised_teacher_log_probs = F.log_softmax(top_teacher_log_probs, dim=-1)
            renormalised_teacher_probs = renormalised_teacher_log_probs.exp()
            forward_top_k = (
                renormalised_teacher_probs * (renormalised_teacher_log_probs - student_log_probs.gather(-1, top_ids))
            ).sum(-1)
        if sampled:
            y = targets[start:end].unsqueeze(-1)
            log_ratio = (student_log_probs.gather(-1, y) - teacher_log_probs.gather(-1, y)).squeeze(-1)
        if mixed_beta:
            mixture_log_probs = torch.logaddexp(
                student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta)
            )
            student_minus_mixture = student_log_probs - mixture_log_probs
            teacher_minus_mixture = mixture_log_probs.neg_().add_(teacher_log_probs)

        torch.exp(log_probs, out=probs)
        student_probs, teacher_probs = probs[:, 0], probs[:, 1]
        log_ratio_all = student_log_probs.sub_(teacher_log_probs)  # log q - log p, in place of log q

        # dots[:, i, j] = <probs_i, log_probs_j> with probs = (q, p) and log_probs = (log q - log p, log p).
        dots = torch.bmm(probs, log_probs.transpose(1, 2))
        reverse_kl = dots[:, 0, 0]
        forward_kl = -dots[:, 1, 0]
        teacher_entropy = -dots[:, 1, 1]
        student_entropy = -(dots[:, 0, 0] + dots[:, 0, 1])

        high_entropy = teacher_entropy > opts.entropy_threshold
        gate = high_entropy.to(torch.float32)
        base_weight = torch.ones_like(gate) if opts.gate == "augment" else 1.0 - gate
        forward_weight = coef * gate

        if sampled:
            base = log_ratio
        elif beta == 1.0:
            base = reverse_kl
        elif beta == 0.0:
            base = forward_kl
        else:
            student_to_mixture = torch.bmm(student_probs.unsqueeze(1), student_minus_mixture.unsqueeze(2)).view(n)
            teacher_to_mixture = torch.bmm(teacher_probs.unsqueeze(1), teacher_minus_mixture.unsqueeze(2)).view(n)
            base = beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture
        forward = forward_kl if top_k is None else forward_top_k

        stats = per_token[start:end]
        stats[:, _TEACHER_ENTROPY] = teacher_entropy
        stats[:, _STUDENT_ENTROPY] = student_entropy
        stats[:, _REVERSE_KL] = reverse_kl
        stats[:, _FORWARD_KL] = forward_kl
        stats[:, _GATED_FORWARD_KL] = forward_kl * gate
        stats[:, _HIGH_ENTROPY] = gate
        stats[:, _BASE_USED] = base_weight * base
        stats[:, _FORWARD_USED] = gate * forward
        stats[:, _LOSS] = stats[:, _BASE_USED] + coef * stats[:, _FORWARD_USED]
        teacher_high_monitor = (teacher_entropy > opts.monitor_entropy_threshold).to(torch.float32)
        stats[:, _TEACHER_HIGH_MONITOR] = teacher_high_monitor
        stats[:, _STUDENT_HIGH_MONITOR] = student_entropy > opts.monitor_entropy_threshold
        stats[:, _FORWARD_KL_TEACHER_HIGH_MONITOR] = forward_kl * teacher_high_monitor

        if not need_any:
            continue

        # Gradient of the chunk's summed loss w.r.t. the tempered student logits s, written as
        #   grad = q * (matrix + q_coef) - p_coef * p + sparse,
        # where every coefficient is per token. Per term:
        #   reverse KL          q * (log q - log p - KL(q||p))
        #   forward KL          q - p
        #   generalized JSD     (1 - beta) * q * (a - <q, a>), a = log q - log m
        #   sampled estimator   k * (onehot(y) - q)
        #   top-k forward KL    q * sum(p~) - scatter(p~)
        grad = log_ratio_all  # reuses log q's storage: the statistics above no longer need it
        q_coef = forward_weight.clone() if top_k is None else forward_weight * renormalised_teacher_probs.sum(-1)
        p_coef = forward_weight if top_k is None else None
        has_matrix = False
        if sampled:
            q_coef -= base_weight * log_ratio
        elif beta == 1.0:
            if opts.gate == "switch":
                grad.mul_(base_weight.unsqueeze(-1))
            q_coef -= base_weight * reverse_kl
            has_matrix = True
        elif beta == 0.0:
            q_coef += base_weight
            p_coef = base_weight if p_coef is None else p_coef + base_weight
        else:
            matrix_weight = (1.0 - beta) * base_weight
            student_mean = torch.bmm(student_probs.unsqueeze(1), student_minus_mixture.unsqueeze(2)).view(n)
            torch.mul(student_minus_mixture, matrix_weight.unsqueeze(-1), out=grad)
            q_coef -= matrix_weight * student_mean
            has_matrix = True

        if has_matrix:
            grad.add_(q_coef.unsqueeze(-1)).mul_(student_probs)
        else:
            torch.mul(student_probs, q_coef.unsqueeze(-1), out=grad)
        if p_coef is not None:
            grad.addcmul_(teacher_probs, p_coef.unsqueeze(-1), value=-1.0)
        if sampled:
            grad.scatter_add_(-1, y, (base_weight * log_ratio).unsqueeze(-1))
        if top_k is not None:
            grad.scatter_add_(-1, top_ids, renormalised_teacher_probs * -forward_weight.unsqueeze(-1))
        if softcap_derivative is not None:
            grad.mul_(softcap_derivative)

        # Push the logit gradient through the projection now, while this chunk's hidden states are at hand.
        hidden = student_hidden[start:end]
        if student_weight.dtype != torch.float32:
            grad = grad.to(student_weight.dtype)
        if need_hidden:
            grad_hidden[start:end] = (grad @ student_weight).float().mul_(grad_scale)
        if need_weight:
            if grad.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), hidden.float(), alpha=grad_scale)
            else:
                grad_weight.add_(grad.t() @ hidden.to(grad.dtype), alpha=grad_scale)
        if grad_bias is not None:
            grad_bias.add_(grad.float().sum(0), alpha=grad_scale)

    sums = per_token.sum(0)
    loss = sums[_LOSS] / divisor
    return loss, sums, grad_hidden, grad_weight, grad_bias


class _ChunkedEOPDFunction(torch.autograd.Function):
    """Autograd wrapper whose forward already computes the student's gradients; backward only rescales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                targets, opts, divisor, chunk_size):  # fmt: skip
        needs_grad = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            student_bias is not None and ctx.needs_input_grad[2],
        )
        loss, sums, grad_hidden, grad_weight, grad_bias = _eopd_chunks(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, targets,
            opts, divisor, chunk_size, needs_grad,
        )  # fmt: skip
        # Kept in the parameters' dtype until backward: for a bf16 model this halves the (vocab, hidden) gradient held
        # between the two passes, and it is the dtype autograd would have produced anyway.
        grads = [
            None if grad is None else grad.to(like.dtype)
            for grad, like in zip(
                (grad_hidden, grad_weight, grad_bias), (student_hidden, student_weight, student_bias)
            )
        ]
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        grads = list(ctx.saved_tensors)
        # The usual caller back-propagates the loss itself (grad_loss == 1): skip a vocabulary-sized multiply then.
        if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:
            grads = [None if grad is None else grad * grad_loss.to(grad.dtype) for grad in grads]
        return (*grads, None, None, None, None, None, None, None)


def chunked_eopd_loss_and_stats(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    targets: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    entropy_threshold: float = 0.8,
    forward_kl_coef: float = 1.0,
    gate: str = "augment",
    beta: float = 1.0,
    temperature: float = 1.0,
    forward_kl_top_k: int | None = None,
    reverse_kl_estimator: str = "analytic",
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 256,
    monitor_entropy_threshold: float = DEFAULT_MONITOR_ENTROPY_THRESHOLD,
) -> tuple[Tensor, EOPDStats]:
    """EOPD loss and statistics computed from hidden states, a chunk of tokens at a time.

    Same value, statistics and student gradients as [`eopd_loss_and_stats`] on the full logits
    `softcap(logit_scale * (hidden @ weight.T + bias))` of both models with `labels = targets`, but only
    `(chunk_size, vocab)` logits exist at any time. The student's gradients are computed in closed form during the forward
    pass, so the backward pass does no vocabulary-sized work. The teacher is treated as a constant: no gradient flows to
    `teacher_hidden`, `teacher_weight` or `teacher_bias`.

    Args:
        student_hidden (`torch.Tensor`):
            Student last hidden states of shape `(N, H_s)` at the loss positions only, already shifted so that row `i`
            predicts `targets[i]`.
        student_weight (`torch.Tensor`):
            Student output projection of shape `(V, H_s)`; it may be tied to the input embeddings.
        teacher_hidden (`torch.Tensor`):
            Teacher last hidden states of shape `(N, H_t)` at the same positions.
        teacher_weight (`torch.Tensor`):
            Teacher output projection of shape `(V, H_t)`, over the same vocabulary as the student's.
        targets (`torch.Tensor`):
            Token ids of shape `(N,)` (the sampled tokens); no -100 entries.
        student_bias (`torch.Tensor`, *optional*):
            Bias of the student's output projection, shape `(V,)`.
        teacher_bias (`torch.Tensor`, *optional*):
            Bias of the teacher's output projection, shape `(V,)`.
        student_logit_scale (`float`, *optional*, defaults to `1.0`):
            Factor applied to the student's projection before the softcap.
        teacher_logit_scale (`float`, *optional*, defaults to `1.0`):
            Factor applied to the teacher's projection before the softcap.
        student_softcap (`float`, *optional*):
            If set, the student's logits are `c * tanh(logits / c)`.
        teacher_softcap (`float`, *optional*):
            If set, the teacher's logits are `c * tanh(logits / c)`.
        entropy_threshold, forward_kl_coef, gate, beta, temperature, forward_kl_top_k, reverse_kl_estimator:
            As in [`eopd_loss`].
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Divisor for the summed loss; defaults to `max(N, 1)`. 0 (no loss token in the whole window) gives 0.
        chunk_size (`int`, *optional*, defaults to `256`):
            Tokens per chunk. Peak memory grows as `2 * 2 * chunk_size * V` float32 values.
        monitor_entropy_threshold (`float`, *optional*, defaults to `0.8`):
            As in [`eopd_loss_and_stats`]: only the statistics' `*_monitor` fields depend on it.

    Returns:
        `tuple[torch.Tensor, EOPDStats]`: the scalar float32 loss (0 with a gradient path when `N == 0`) and the
        detached statistics of the batch.
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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an integer >= 1; got {chunk_size!r}.")
    for name, value in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if value is not None and not value > 0:
            raise ValueError(f"`{name}` must be None or a number > 0; got {value!r}.")
    num_tokens = targets.numel()
    if targets.dim() != 1 or student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError(
            f"Expected `student_hidden` (N, H_s), `teacher_hidden` (N, H_t) and `targets` (N,); got shapes "
            f"{tuple(student_hidden.shape)}, {tuple(teacher_hidden.shape)} and {tuple(targets.shape)}."
        )
    if student_hidden.size(0) != num_tokens or teacher_hidden.size(0) != num_tokens:
        raise ValueError(
            f"`student_hidden`, `teacher_hidden` and `targets` must have the same number of rows; got "
            f"{student_hidden.size(0)}, {teacher_hidden.size(0)} and {num_tokens}."
        )
    if student_weight.size(0) != teacher_weight.size(0):
        raise ValueError(
            f"The student and teacher projections must share the vocabulary; got {student_weight.size(0)} and "
            f"{teacher_weight.size(0)} rows."
        )
    if student_weight.size(1) != student_hidden.size(1) or teacher_weight.size(1) != teacher_hidden.size(1):
        raise ValueError(
            f"Hidden sizes do not match the projections: student {student_hidden.size(1)} vs {student_weight.size(1)}, "
            f"teacher {teacher_hidden.size(1)} vs {teacher_weight.size(1)}."
        )

    divisor = float(num_items_in_batch) if num_items_in_batch is not None else float(max(num_tokens, 1))
    if not math.isfinite(divisor) or divisor < 0:
        raise ValueError(f"`num_items_in_batch` must be a finite number >= 0; got {num_items_in_batch!r}.")
    if divisor == 0.0:
        # The whole accumulation window has no loss token, so this batch's summed loss is 0 too: keep it 0, not NaN.
        divisor = 1.0
    opts = _Options(
        entropy_threshold=float(entropy_threshold),
        forward_kl_coef=float(forward_kl_coef),
        gate=gate,
        beta=float(beta),
        temperature=float(temperature),
        forward_kl_top_k=forward_kl_top_k,
        reverse_kl_estimator=reverse_kl_estimator,
        monitor_entropy_threshold=float(monitor_entropy_threshold),
        student_logit_scale=float(student_logit_scale),
        teacher_logit_scale=float(teacher_logit_scale),
        student_softcap=None if student_softcap is None else float(student_softcap),
        teacher_softcap=None if teacher_softcap is None else float(teacher_softcap),
    )
    # The teacher is a constant of the loss: detaching it keeps autograd from recording anything on its side.
    teacher_args = (
        teacher_hidden.detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )
    student_tensors = [t for t in (student_hidden, student_weight, student_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in student_tensors):
        loss, sums = _ChunkedEOPDFunction.apply(
            student_hidden, student_weight, student_bias, *teacher_args, targets, opts, divisor, chunk_size
        )
    else:
        with torch.no_grad():
            loss, sums, *_ = _eopd_chunks(
                student_hidden, student_weight, student_bias, *teacher_args, targets, opts, divisor, chunk_size,
                (False, False, False),
            )  # fmt: skip

    stats = EOPDStats(
        num_tokens=torch.tensor(num_tokens, dtype=torch.int64, device=student_hidden.device),
        num_high_entropy=sums[_HIGH_ENTROPY].round().to(torch.int64),
        teacher_entropy=sums[_TEACHER_ENTROPY],
        student_entropy=sums[_STUDENT_ENTROPY],
        reverse_kl=sums[_REVERSE_KL],
        forward_kl=sums[_FORWARD_KL],
        forward_kl_high_entropy=sums[_GATED_FORWARD_KL],
        loss_base=sums[_BASE_USED],
        loss_forward=sums[_FORWARD_USED],
        num_teacher_high_entropy_monitor=sums[_TEACHER_HIGH_MONITOR].round().to(torch.int64),
        num_student_high_entropy_monitor=sums[_STUDENT_HIGH_MONITOR].round().to(torch.int64),
        forward_kl_teacher_high_entropy_monitor=sums[_FORWARD_KL_TEACHER_HIGH_MONITOR],
    )
    return loss, stats
