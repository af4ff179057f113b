"""Memory-efficient EOPD loss that never holds full logits for every position.

The loss is computed from the last hidden states of the loss positions and the two output projections, a chunk of
tokens at a time. For each chunk the forward pass projects both models, computes every per-token term and, when the
student needs gradients, the closed-form gradient of the chunk's loss with respect to the student's logits. That
gradient is pushed through the projection immediately, so the backward pass only rescales gradients that already exist:
nothing is recomputed and no chunk's logits outlive its iteration. Peak memory is therefore a few `(chunk_size, vocab)`
float32 buffers plus the `(vocab, hidden)` weight gradient, whatever the number of tokens.

The values match [`trl_eopd.eopd_loss_and_stats`] on full logits `softcap(scale * (hidden @ weight.T + bias))`; the
float64 reference tests hold both to the formula.

Why closed-form gradients, and why not TRL 1.16's `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (what
`DistillationTrainer` uses): that function returns one divergence and the student's entropy per token. EOPD needs, in
the same pass, the teacher's entropy (the gate), a second divergence on gated tokens (the top-k renormalised forward
KL, or the full one), the sampled estimator's token log-probs and the monitor statistics. Built from it, the loss
would project both models once per divergence in the forward pass and again in its backward pass, which recomputes
the tiles. Here each chunk is projected once: every term, and the student's logit gradient of their weighted sum
(short closed forms, one per divergence, below), come from the same `(chunk, vocab)` buffers, and the gradient is
pushed through the projection before the next chunk. `docs/benchmarks.md` has the measured step times and memory.

Layout: the projection (both models' tempered logits, and the way back to the student's parameters), the per-token
terms (one short function per divergence), their closed-form gradients (one short function per divergence), then the
chunk driver that strings them together, the autograd wrapper and the public function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .importance import ImportanceCorrection
from .options import EOPDLossOptions
from .stats import EOPDStats

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
class _Options(EOPDLossOptions):
    """The loss options plus how each model turns hidden states into logits."""

    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None


# ------------------------------------------------------------------------------------------------------ projection


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


def _project_chunk(
    logits: Tensor,
    student: tuple[Tensor, Tensor, Tensor | None],
    teacher: tuple[Tensor, Tensor, Tensor | None],
    opts: _Options,
    softcap_derivative: Tensor | None,
) -> None:
    """Fill `logits[:, 0]` and `logits[:, 1]` with the student's and the teacher's tempered logits.

    `student` and `teacher` are each `(hidden rows of this chunk, weight, bias)`.
    """
    student_logits, teacher_logits = logits[:, 0], logits[:, 1]
    _project_into(student_logits, *student)
    _project_into(teacher_logits, *teacher)
    _scale_into_tempered_logits(
        student_logits, opts.student_logit_scale, opts.student_softcap, opts.temperature, softcap_derivative
    )
    _scale_into_tempered_logits(teacher_logits, opts.teacher_logit_scale, opts.teacher_softcap, opts.temperature, None)


def _add_projection_gradients(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
    scale: float,
) -> None:
    """Push one chunk's logit gradient through `hidden @ weight.T + bias`, times `scale`.

    `grad_hidden` is this chunk's rows and is overwritten; `grad_weight` and `grad_bias` accumulate over chunks.
    """
    if weight.dtype != torch.float32:
        grad = grad.to(weight.dtype)
    if grad_hidden is not None:
        grad_hidden.copy_((grad @ weight).float().mul_(scale))
    if grad_weight is not None:
        if grad.dtype == torch.float32:
            grad_weight.addmm_(grad.t(), hidden.float(), alpha=scale)
        else:
            grad_weight.add_(grad.t() @ hidden.to(grad.dtype), alpha=scale)
    if grad_bias is not None:
        grad_bias.add_(grad.float().sum(0), alpha=scale)


# ------------------------------------------------------------------------------------------------ per-token terms


@dataclass
class _ChunkTerms:
    """One chunk's per-token terms (shape `(n,)`) and the `(n, V)` tensors that their gradients need."""

    student_probs: Tensor  # q
    teacher_probs: Tensor  # p
    log_ratio: Tensor  # log q - log p; the logit gradient is later assembled in its storage
    teacher_entropy: Tensor
    student_entropy: Tensor
    reverse_kl: Tensor
    forward_kl: Tensor
    gate: Tensor  # 1.0 where the teacher's entropy is above the threshold
    base_weight: Tensor
    base: Tensor
    forward: Tensor
    target_log_probs: Tensor  # log q(y) at the targets
    # Only the option that needs them sets these.
    sampled_ids: Tensor | None = None  # (n, 1)
    sampled_log_ratio: Tensor | None = None  # log q(y) - log p(y)
    top_ids: Tensor | None = None  # (n, k)
    top_teacher_probs: Tensor | None = None  # p~, the teacher renormalised over its top-k tokens
    student_minus_mixture: Tensor | None = None  # log q - log m
    student_to_mixture: Tensor | None = None  # KL(q || m)


def log_softmax_into(out: Tensor, logits: Tensor) -> Tensor:
    """`log_softmax(logits, -1)` written into `out`, as `logits - logsumexp(logits)`.

    On CPU, float32 `torch.log_softmax` over a ~150k vocabulary was measured up to 2e-4 off (absolute) on rows where
    one token holds most of the mass, a shift of the whole row that passes into log q(y), the KL terms and the
    entropies; `logits - torch.logsumexp(logits)` stayed within 3e-6 (`python tests/test_large_vocab_precision.py`).
    """
    return torch.sub(logits, torch.logsumexp(logits, dim=-1, keepdim=True), out=out)


# Vocabulary entries summed per batched matmul before the partial sums are added: one float32 bmm over a whole
# ~150k vocabulary was measured 8e-5 off on peaked rows (CPU), blocks of 4096 within 1e-5, at no extra memory
# (`python tests/test_large_vocab_precision.py`).
_DOT_BLOCK = 4096


def _vocab_bmm(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b.transpose(1, 2)` for `(n, i, V)` and `(n, j, V)`, summed over the vocabulary `_DOT_BLOCK` at a time."""
    out = torch.bmm(a[..., :_DOT_BLOCK], b[..., :_DOT_BLOCK].transpose(1, 2))
    for start in range(_DOT_BLOCK, a.size(-1), _DOT_BLOCK):
        out += torch.bmm(a[..., start : start + _DOT_BLOCK], b[..., start : start + _DOT_BLOCK].transpose(1, 2))
    return out


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """`(a * b).sum(-1)` for `(n, V)` tensors, as batched matmuls that need no `(n, V)` temporary."""
    return _vocab_bmm(a.unsqueeze(1), b.unsqueeze(1)).view(a.size(0))


def _top_k_forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, top_k: int):
    """KL(p~ || q), with the token ids of p~ and p~ itself."""
    top_teacher_log_probs, top_ids = teacher_log_probs.topk(top_k, dim=-1)
    renormalised_log_probs = F.log_softmax(top_teacher_log_probs, dim=-1)
    renormalised_probs = renormalised_log_probs.exp()
    value = (renormalised_probs * (renormalised_log_probs - student_log_probs.gather(-1, top_ids))).sum(-1)
    return value, top_ids, renormalised_probs


def _sampled_log_ratio(student_log_probs: Tensor, teacher_log_probs: Tensor, ids: Tensor) -> Tensor:
    """log q(y) - log p(y) at the sampled tokens `ids` `(n, 1)`: the single-sample reverse-KL estimate."""
    return (student_log_probs.gather(-1, ids) - teacher_log_probs.gather(-1, ids)).squeeze(-1)


def _mixture_log_ratios(student_log_probs: Tensor, teacher_log_probs: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(log q - log m, log p - log m) for the mixture m = beta * p + (1 - beta) * q."""
    mixture_log_probs = torch.logaddexp(student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta))
    student_minus_mixture = student_log_probs - mixture_log_probs
    return student_minus_mixture, mixture_log_probs.neg_().add_(teacher_log_probs)


def _entropies_and_kls(probs: Tensor, log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """H(p), H(q), KL(q || p) and KL(p || q) from `probs = (q, p)` and `log_probs = (log q - log p, log p)`.

    One batched 2x2 matmul (in blocks of the vocabulary) gives the dot products `<probs_i, log_probs_j>` per token.
    """
    dots = _vocab_bmm(probs, log_probs)
    teacher_entropy = -dots[:, 1, 1]
    student_entropy = -(dots[:, 0, 0] + dots[:, 0, 1])
    return teacher_entropy, student_entropy, dots[:, 0, 0], -dots[:, 1, 0]


def _per_token_terms(
    probs: Tensor, log_probs: Tensor, targets: Tensor, opts: _Options, top_k: int | None
) -> _ChunkTerms:
    """Every per-token term of the loss, from the tempered logits `(n, 2, V)` held in `probs`.

    With q the student's and p the teacher's distribution, each token's loss is

        base_weight * base + forward_kl_coef * gate * forward,
        gate = 1[H(p) > entropy_threshold],  base_weight = 1 ("augment") or 1 - gate ("switch"),
        base = KL(q || p), the generalized JSD of `beta`, or log q(y) - log p(y) ("sampled"),
        forward = KL(p || q), or KL(p~ || q) with p~ the teacher renormalised over its `top_k` tokens,

    as in [`eopd_loss_and_stats`]. `probs` is overwritten with (q, p) and `log_probs` with (log q - log p, log p).
    """
    log_softmax_into(log_probs, probs)
    student_log_probs, teacher_log_probs = log_probs[:, 0], log_probs[:, 1]
    sampled = opts.reverse_kl_estimator == "sampled"
    beta = opts.beta
    top_ids = top_teacher_probs = sampled_ids = sampled_log_ratio = student_minus_mixture = student_to_mixture = None

    # Whatever needs log q itself is read here, before its storage becomes log q - log p.
    target_log_probs = student_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if top_k is not None:
        forward_top_k, top_ids, top_teacher_probs = _top_k_forward_kl(student_log_probs, teacher_log_probs, top_k)
    if sampled:
        sampled_ids = targets.unsqueeze(-1)
        sampled_log_ratio = _sampled_log_ratio(student_log_probs, teacher_log_probs, sampled_ids)
    elif 0.0 < beta < 1.0:
        student_minus_mixture, teacher_minus_mixture = _mixture_log_ratios(student_log_probs, teacher_log_probs, beta)

    torch.exp(log_probs, out=probs)
    student_probs, teacher_probs = probs[:, 0], probs[:, 1]
    log_ratio = student_log_probs.sub_(teacher_log_probs)
    teacher_entropy, student_entropy, reverse_kl, forward_kl = _entropies_and_kls(probs, log_probs)

    if sampled:
        base = sampled_log_ratio
    elif beta == 1.0:
        base = reverse_kl
    elif beta == 0.0:
        base = forward_kl
    else:
        student_to_mixture = _row_dots(student_probs, student_minus_mixture)
        base = beta * _row_dots(teacher_probs, teacher_minus_mixture) + (1.0 - beta) * student_to_mixture
    gate = (teacher_entropy > opts.entropy_threshold).to(torch.float32)
    return _ChunkTerms(
        student_probs=student_probs,
        teacher_probs=teacher_probs,
        log_ratio=log_ratio,
        teacher_entropy=teacher_entropy,
        student_entropy=student_entropy,
        reverse_kl=reverse_kl,
        forward_kl=forward_kl,
        gate=gate,
        base_weight=torch.ones_like(gate) if opts.gate == "augment" else 1.0 - gate,
        base=base,
        forward=forward_kl if top_k is None else forward_top_k,
        target_log_probs=target_log_probs,
        sampled_ids=sampled_ids,
        sampled_log_ratio=sampled_log_ratio,
        top_ids=top_ids,
        top_teacher_probs=top_teacher_probs,
        student_minus_mixture=student_minus_mixture,
        student_to_mixture=student_to_mixture,
    )


def _record_stats(stats: Tensor, terms: _ChunkTerms, opts: _Options) -> None:
    """Fill this chunk's rows of the per-token statistics table."""
    stats[:, _TEACHER_ENTROPY] = terms.teacher_entropy
    stats[:, _STUDENT_ENTROPY] = terms.student_entropy
    stats[:, _REVERSE_KL] = terms.reverse_kl
    stats[:, _FORWARD_KL] = terms.forward_kl
    stats[:, _GATED_FORWARD_KL] = terms.forward_kl * terms.gate
    stats[:, _HIGH_ENTROPY] = terms.gate
    stats[:, _BASE_USED] = terms.base_weight * terms.base
    stats[:, _FORWARD_USED] = terms.gate * terms.forward
    stats[:, _LOSS] = stats[:, _BASE_USED] + opts.forward_kl_coef * stats[:, _FORWARD_USED]
    teacher_high_monitor = (terms.teacher_entropy > opts.monitor_entropy_threshold).to(torch.float32)
    stats[:, _TEACHER_HIGH_MONITOR] = teacher_high_monitor
    stats[:, _STUDENT_HIGH_MONITOR] = terms.student_entropy > opts.monitor_entropy_threshold
    stats[:, _FORWARD_KL_TEACHER_HIGH_MONITOR] = terms.forward_kl * teacher_high_monitor


# ---------------------------------------------------------------------------------------- closed-form gradients


@dataclass
class _LogitGradient:
    """Gradient of a chunk's summed loss w.r.t. the tempered student logits, kept as

        q * (matrix + q_coef) - p_coef * p + sum of scatters,

    with per-token `q_coef` and `p_coef`. Each divergence below adds its share for a per-token weight `w`; only the
    base term has a `matrix` (held in the chunk's log-ratio storage), so no `(n, V)` buffer is added per term.
    """

    q_coef: Tensor
    p_coef: Tensor | None = None
    matrix: Tensor | None = None
    scatters: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def _add_reverse_kl_gradient(grad: _LogitGradient, terms: _ChunkTerms, w: Tensor, w_is_one: bool) -> None:
    # d KL(q || p) / ds = q * (log q - log p - KL(q || p)); an all-ones `w` ("augment") skips a (n, V) multiply
    grad.matrix = terms.log_ratio if w_is_one else terms.log_ratio.mul_(w.unsqueeze(-1))
    grad.q_coef -= w * terms.reverse_kl


def _add_forward_kl_gradient(grad: _LogitGradient, terms: _ChunkTerms, w: Tensor) -> None:
    # d KL(p || q) / ds = q - p
    grad.q_coef += w
    grad.p_coef = w if grad.p_coef is None else grad.p_coef + w


def _add_generalized_jsd_gradient(grad: _LogitGradient, terms: _ChunkTerms, w: Tensor, beta: float) -> None:
    # d JSD_beta / ds = (1 - beta) * q * (a - <q, a>), with a = log q - log m
    matrix_weight = (1.0 - beta) * w
    grad.matrix = torch.mul(terms.student_minus_mixture, matrix_weight.unsqueeze(-1), out=terms.log_ratio)
    grad.q_coef -= matrix_weight * terms.student_to_mixture


def _add_sampled_reverse_kl_gradient(grad: _LogitGradient, terms: _ChunkTerms, w: Tensor) -> None:
    # d [k * log q(y)] / ds = k * (onehot(y) - q), with k = log q(y) - log p(y) held constant
    weighted_log_ratio = w * terms.sampled_log_ratio
    grad.q_coef -= weighted_log_ratio
    grad.scatters.append((terms.sampled_ids, weighted_log_ratio.unsqueeze(-1)))


def _add_top_k_forward_kl_gradient(grad: _LogitGradient, terms: _ChunkTerms, w: Tensor) -> None:
    # d KL(p~ || q) / ds = q * sum(p~) - scatter(p~)
    grad.q_coef += w * terms.top_teacher_probs.sum(-1)
    grad.scatters.append((terms.top_ids, terms.top_teacher_probs * -w.unsqueeze(-1)))


def _student_logit_gradient(
    terms: _ChunkTerms, opts: _Options, top_k: int | None, softcap_derivative: Tensor | None
) -> Tensor:
    """d(sum of the chunk's per-token losses) / d(tempered student logits), written over `terms.log_ratio`."""
    grad = _LogitGradient(q_coef=torch.zeros_like(terms.gate))
    if opts.reverse_kl_estimator == "sampled":
        _add_sampled_reverse_kl_gradient(grad, terms, terms.base_weight)
    elif opts.beta == 1.0:
        _add_reverse_kl_gradient(grad, terms, terms.base_weight, w_is_one=opts.gate == "augment")
    elif opts.beta == 0.0:
        _add_forward_kl_gradient(grad, terms, terms.base_weight)
    else:
        _add_generalized_jsd_gradient(grad, terms, terms.base_weight, opts.beta)
    forward_weight = opts.forward_kl_coef * terms.gate
    if top_k is None:
        _add_forward_kl_gradient(grad, terms, forward_weight)
    else:
        _add_top_k_forward_kl_gradient(grad, terms, forward_weight)

    # The statistics are recorded, so log q - log p may be overwritten (it is the matrix itself when there is one).
    out = terms.log_ratio
    if grad.matrix is not None:
        out.add_(grad.q_coef.unsqueeze(-1)).mul_(terms.student_probs)
    else:
        torch.mul(terms.student_probs, grad.q_coef.unsqueeze(-1), out=out)
    if grad.p_coef is not None:
        out.addcmul_(terms.teacher_probs, grad.p_coef.unsqueeze(-1), value=-1.0)
    for ids, values in grad.scatters:
        out.scatter_add_(-1, ids, values)
    if softcap_derivative is not None:
        out.mul_(softcap_derivative)
    return out


# ---------------------------------------------------------------------------------------------------- chunk driver


def _zero_student_gradients(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None, needs_grad: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Float32 accumulators for the gradients of the student's hidden states, weight and bias (None if not needed)."""
    need_hidden, need_weight, need_bias = needs_grad

    def zeros(like):
        return torch.zeros(like.shape, dtype=torch.float32, device=student_hidden.device)

    return (
        zeros(student_hidden) if need_hidden else None,
        zeros(student_weight) if need_weight else None,
        zeros(student_bias) if need_bias and student_bias is not None else None,
    )


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
    target_log_probs_out: Tensor | None = None,
    importance: ImportanceCorrection | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss, per-token statistic sums and (optionally) the loss's gradients w.r.t. the student's hidden, weight, bias.

    Returns `(loss, stat_sums, grad_hidden, grad_weight, grad_bias)`, where `stat_sums` holds the column sums of the
    per-token table (see the `_TEACHER_ENTROPY`... indices) and gradients are None where not requested.
    """
    device = student_hidden.device
    num_tokens, vocab_size = targets.numel(), student_weight.size(0)
    need_any = any(needs_grad)
    top_k = None if opts.forward_kl_top_k is None else min(opts.forward_kl_top_k, vocab_size)

    per_token = torch.zeros((num_tokens, _NUM_COLUMNS), dtype=torch.float32, device=device)
    grad_hidden, grad_weight, grad_bias = _zero_student_gradients(student_hidden, student_weight, student_bias,
                                                                  needs_grad)  # fmt: skip

    rows = min(chunk_size, num_tokens)
    # Student and teacher share one (rows, 2, vocab) buffer so that a single log-softmax, a single exp and one batched
    # 2x2 matmul serve both models.
    probs_buffer = torch.empty(rows, 2, vocab_size, dtype=torch.float32, device=device)
    log_probs_buffer = torch.empty_like(probs_buffer)
    softcap_derivative_buffer = (
        torch.empty(rows, vocab_size, dtype=torch.float32, device=device)
        if need_any and opts.student_softcap is not None
        else None
    )
    # d(loss)/d(projection) = d(loss)/d(tempered logits) * logit_scale / temperature (times the softcap's derivative,
    # elementwise), over the reduction's constant divisor: the scalars are folded into one factor that is applied to
    # the small (chunk, hidden) and (vocab, hidden) results, never to a vocabulary-sized chunk.
    grad_scale = opts.student_logit_scale / opts.temperature / divisor

    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        n = end - start
        probs, log_probs = probs_buffer[:n], log_probs_buffer[:n]
        softcap_derivative = None if softcap_derivative_buffer is None else softcap_derivative_buffer[:n]
        student_rows = student_hidden[start:end]

        _project_chunk(
            probs,
            (student_rows, student_weight, student_bias),
            (teacher_hidden[start:end], teacher_weight, teacher_bias),
            opts,
            softcap_derivative,
        )
        terms = _per_token_terms(probs, log_probs, targets[start:end], opts, top_k)
        if importance is not None and opts.reverse_kl_estimator == "sampled":
            # Only the sampled estimate depends on which token was drawn (see `importance.py`).
            terms.base_weight = terms.base_weight * importance.ratios(terms.target_log_probs, start, end)
        _record_stats(per_token[start:end], terms, opts)
        if target_log_probs_out is not None:
            target_log_probs_out[start:end] = terms.target_log_probs
        if need_any:
            # Pushed through the projection now, while this chunk's hidden states are at hand.
            grad = _student_logit_gradient(terms, opts, top_k, softcap_derivative)
            _add_projection_gradients(
                grad,
                student_rows,
                student_weight,
                None if grad_hidden is None else grad_hidden[start:end],
                grad_weight,
                grad_bias,
                grad_scale,
            )

    sums = per_token.sum(0)
    loss = sums[_LOSS] / divisor
    return loss, sums, grad_hidden, grad_weight, grad_bias


class _ChunkedEOPDFunction(torch.autograd.Function):
    """Autograd wrapper whose forward already computes the student's gradients; backward only rescales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                targets, opts, divisor, chunk_size, target_log_probs_out, importance):  # fmt: skip
        needs_grad = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            student_bias is not None and ctx.needs_input_grad[2],
        )
        loss, sums, grad_hidden, grad_weight, grad_bias = _eopd_chunks(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, targets,
            opts, divisor, chunk_size, needs_grad, target_log_probs_out, importance,
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
        return (*grads, None, None, None, None, None, None, None, None, None)


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
    options: EOPDLossOptions | None = None,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 256,
    target_log_probs_out: Tensor | None = None,
    importance: ImportanceCorrection | None = None,
    **option_overrides,
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
        options ([`EOPDLossOptions`], *optional*):
            The loss options; defaults to `EOPDLossOptions()`, the paper's.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Divisor for the summed loss; defaults to `max(N, 1)`. 0 (no loss token in the whole window) gives 0.
        chunk_size (`int`, *optional*, defaults to `256`):
            Tokens per chunk. Peak memory grows as `2 * 2 * chunk_size * V` float32 values.
        target_log_probs_out (`torch.Tensor`, *optional*):
            As in [`eopd_loss_and_stats`]: a float32 tensor of shape `(N,)` that receives the student's tempered
            log-probability of each target, detached.
        importance ([`ImportanceCorrection`], *optional*):
            As in [`eopd_loss_and_stats`]: for tokens sampled by older weights, the sampled reverse-KL term of each
            token is weighted by its truncated importance ratio.
        **option_overrides:
            Any field of [`EOPDLossOptions`] by name, replacing its value in `options`.

    Returns:
        `tuple[torch.Tensor, EOPDStats]`: the scalar float32 loss (0 with a gradient path when `N == 0`) and the
        detached statistics of the batch.
    """
    loss_options = EOPDLossOptions.resolve(options, option_overrides)
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
        **{name: getattr(loss_options, name) for name in EOPDLossOptions.names()},
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
            student_hidden, student_weight, student_bias, *teacher_args, targets, opts, divisor, chunk_size,
            target_log_probs_out, importance,
        )  # fmt: skip
    else:
        with torch.no_grad():
            loss, sums, *_ = _eopd_chunks(
                student_hidden, student_weight, student_bias, *teacher_args, targets, opts, divisor, chunk_size,
                (False, False, False), target_log_probs_out, importance,
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
