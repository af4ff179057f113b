"""The EOPD loss with a served teacher: the student's hidden states against the teacher's top-k log-probabilities.

A vLLM server returns, per completion token, the teacher's top-K log-probabilities with their ids and the
log-probability of the sampled token (see `trl_eopd/teacher_server.py`). From them, exactly as with a local teacher:

- the sampled reverse-KL estimate `log q(y) - log p(y)` and its policy gradient (the paper's OPD term);
- the forward KL over the teacher's top-k, renormalised, against the student's full-vocabulary log-softmax gathered
  at the teacher's ids (the `forward_kl_top_k` term of [`eopd_loss_and_stats`]).

Only the gate differs: a stock server does not return the teacher's entropy (a server with trl-eopd's vLLM plugin
does, and is then passed as `teacher_entropy`), so it is estimated from the top-K and the tail mass
`m = 1 - sum of the top-K probabilities`. Over a vocabulary of V tokens it lies between

    H_topK + the tail as concentrated as the ranking allows (tokens of probability p_K; at least -m log m)
    H_topK - m log(m / (V - K))   (the tail spread evenly)

and the gate takes, by default (`"decay"`), the entropy of a modelled tail clamped into those bounds: the top-K's own
decay continued past rank K (see `_decayed_tail_entropy`). The midpoint of the bounds, the one estimate that makes no
assumption on the tail, reads low by up to 0.09 nats at the 0.8-nat threshold on most tails of a 151,936-token
vocabulary, so it closes gates it should open; the modelled tail reads within 0.011 nats on average on 12 of the 13
tails of `scripts/teacher_gate_agreement.py --synthetic` at K = 32 (docs/teacher_server.md has the numbers, and where
it fails). The other estimates stay selectable (`ENTROPY_ESTIMATES`). Wherever the estimated gate
equals the exact one, loss and gradients equal the local teacher's.

The student side is the chunked loss's (`trl_eopd/loss/chunked.py`): its projection and closed-form gradient helpers
are reused, so no `(tokens, vocab)` logits outlive their chunk and the backward pass does no vocabulary-sized work.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import (
    _add_projection_gradients,
    _ChunkedEOPDFunction,
    _ChunkTerms,
    _Options,
    _project_into,
    _row_dots,
    _scale_into_tempered_logits,
    _student_logit_gradient,
    _zero_student_gradients,
    log_softmax_into,
)
from .importance import ImportanceCorrection
from .options import EOPDLossOptions

# The gate's teacher-entropy estimates with a served teacher, the default first (see `estimate_teacher_entropy`).
ENTROPY_ESTIMATES = ("decay", "midpoint", "lower", "upper", "top_k")
DEFAULT_ENTROPY_ESTIMATE = ENTROPY_ESTIMATES[0]
# The decay model's tail, ranks K+1..V, is summed over bins: the first ranks one by one, where a steep decay puts
# most of the tail's mass, then bins whose last rank is about 10% above their first. Finer bins moved the estimate by
# under 1e-4 nats on the script's teachers.
_EXACT_TAIL_RANKS = 32
_TAIL_BIN_RATIO = 1.1
_DECAY_NEWTON_STEPS = 50

(
    _TEACHER_ENTROPY_ESTIMATE,
    _TEACHER_TAIL_MASS,
    _STUDENT_ENTROPY,
    _SAMPLED_REVERSE_KL,
    _FORWARD_KL_TOP_K,
    _FORWARD_KL_TOP_K_GATED,
    _GATE,
    _BASE_USED,
    _FORWARD_USED,
    _LOSS,
    _STUDENT_HIGH_MONITOR,
    _TEACHER_HIGH_MONITOR_ESTIMATE,
    _GATE_AMBIGUOUS,
) = range(13)
_NUM_COLUMNS = 13


@dataclass
class ServedTeacherStats:
    """Sums over a batch's loss tokens of what a served teacher lets one compute honestly (detached tensors).

    Nothing here needs the teacher's full distribution: its entropy is the one behind the gate, the estimate (named
    so) unless the server gave the exact entropy (counted in `num_exact_entropy`; then named as a local teacher's), the
    forward KL is the top-k one the loss uses, and the reverse KL is the sampled estimate. `loss_base` and
    `loss_forward` enter the loss as loss * divisor = loss_base + forward_kl_coef * loss_forward.
    """

    num_tokens: Tensor
    num_high_entropy: Tensor
    teacher_entropy_estimate: Tensor
    teacher_tail_mass: Tensor
    student_entropy: Tensor
    sampled_reverse_kl: Tensor
    forward_kl_top_k: Tensor
    forward_kl_top_k_high_entropy: Tensor
    loss_base: Tensor
    loss_forward: Tensor
    num_student_high_entropy_monitor: Tensor
    num_teacher_high_entropy_monitor_estimate: Tensor
    num_exact_entropy: Tensor
    num_gate_ambiguous: Tensor

    def to_tensor(self) -> Tensor:
        """Pack into one float64 vector, so a single collective reduces every statistic."""
        return torch.stack([getattr(self, f.name).detach().to(torch.float64).reshape(()) for f in fields(self)])

    @classmethod
    def from_tensor(cls, packed: Tensor) -> ServedTeacherStats:
        return cls(*packed.unbind(-1))

    def means(self) -> dict[str, float]:
        """Per-token means, named as they are logged (`eopd/...`). Empty batches give 0.0, not NaN."""
        n = max(float(self.num_tokens), 1.0)
        n_high = max(float(self.num_high_entropy), 1.0)
        # A run's server either gives the exact entropy for every token or for none (the client checks).
        exact = float(self.num_exact_entropy) > 0
        suffix = "" if exact else "_estimate"
        return {
            f"eopd/teacher_entropy{suffix}": float(self.teacher_entropy_estimate) / n,
            "eopd/teacher_entropy_exact": float(self.num_exact_entropy) / n,
            "eopd/teacher_tail_mass": float(self.teacher_tail_mass) / n,
            "eopd/gate_ambiguous_ratio": float(self.num_gate_ambiguous) / n,
            "eopd/student_entropy": float(self.student_entropy) / n,
            "eopd/high_entropy_ratio": float(self.num_high_entropy) / n,
            "eopd/reverse_kl_sampled": float(self.sampled_reverse_kl) / n,
            "eopd/forward_kl_top_k": float(self.forward_kl_top_k) / n,
            "eopd/forward_kl_top_k_high_entropy": float(self.forward_kl_top_k_high_entropy) / n_high,
            "eopd/loss_base": float(self.loss_base) / n,
            "eopd/loss_forward_gated": float(self.loss_forward) / n,
            "eopd/monitor/student_high_entropy_ratio": float(self.num_student_high_entropy_monitor) / n,
            f"eopd/monitor/teacher_high_entropy_ratio{suffix}": (
                float(self.num_teacher_high_entropy_monitor_estimate) / n
            ),
        }


def teacher_entropy_bounds(top_log_probs: Tensor, vocab_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(lower, upper, top_k_entropy, tail_mass)` of the teacher's entropy in nats, from its top-K log-probabilities.

    `top_log_probs` is `(N, K)`, sorted by rank (-inf for a zero probability). The tail mass `m` outside the top-K adds
    at most `-m log(m / (V - K))` to the top-K entropy (spread evenly) and at least what it adds when it is as
    concentrated as the ranking allows: no tail token is more likely than the K-th, so the tail is at least
    `floor(m / p_K)` tokens of probability `p_K` plus one of the rest. That lower bound is never below
    `-m log m` (all the tail on one token), and much tighter when the tail is heavier than `p_K`. Computed in float64.
    """
    log_probs = top_log_probs.double()
    probs = log_probs.exp()
    top_k_entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
    tail_mass = (1.0 - probs.sum(-1)).clamp_min(0.0)
    smallest = probs[:, -1:].squeeze(-1) if probs.size(-1) else torch.zeros_like(tail_mass)
    full_tokens = torch.where(smallest > 0, torch.floor(tail_mass / smallest.clamp_min(1e-300)), 0.0)
    remainder = tail_mass - full_tokens * smallest
    concentrated = -full_tokens * torch.where(smallest > 0, smallest * smallest.clamp_min(1e-300).log(), 0.0)
    concentrated -= torch.where(remainder > 0, remainder * remainder.clamp_min(1e-300).log(), 0.0)
    tail_tokens = vocab_size - top_log_probs.size(-1)
    spread = torch.where(
        tail_mass > 0,
        -tail_mass * (tail_mass.clamp_min(1e-300).log() - math.log(max(tail_tokens, 1))),
        torch.zeros_like(tail_mass),
    )
    lower = top_k_entropy + torch.minimum(concentrated, spread)  # equal up to rounding when the tail is even
    return lower, top_k_entropy + spread, top_k_entropy, tail_mass


@functools.lru_cache(maxsize=16)
def _tail_rank_bins(top_k: int, vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Bins of the tail ranks K+1..V: `(log rank count, L = log(rank / K), steepening G(L))` at each bin's centre.

    `G` is how much faster than its local power law at rank K a Gaussian-logit tail falls: with `z_r` the expected
    standard-normal logit of rank r among V, `G = (z_K - z_r) + (dz/dL at K) L`, which is 0 with slope 0 at L = 0
    and grows with L (z is concave in L). A teacher with Gaussian logits of s.d. s has `log p_r = log p_K - s (z_K -
    z_r)`, i.e. the local exponent plus `s G`.
    """
    starts, rank = [], top_k + 1
    while rank <= vocab_size:
        starts.append(rank)
        rank = rank + 1 if rank <= top_k + _EXACT_TAIL_RANKS else max(rank + 1, math.ceil(rank * _TAIL_BIN_RATIO))
    edges = torch.tensor([*starts, vocab_size + 1], dtype=torch.float64, device=device)
    first, last = edges[:-1], edges[1:] - 1
    centre = (first * last).sqrt()
    log_rank = (centre / top_k).log()

    def expected_logit(rank):
        return torch.special.ndtri(1 - (rank - 0.5) / vocab_size)

    z_k = expected_logit(torch.tensor(float(top_k), dtype=torch.float64, device=device))
    slope_at_k = -top_k / vocab_size / (torch.exp(-z_k.square() / 2) / math.sqrt(2 * math.pi))  # dz/dL at rank K
    steepening = (z_k - expected_logit(centre) + slope_at_k * log_rank).clamp_min(0.0)
    return (last - first + 1).log(), log_rank, steepening


def _decayed_tail_entropy(log_probs: Tensor, tail_mass: Tensor, vocab_size: int) -> Tensor:
    """Entropy of the tail (ranks K+1..V) modelled as the top-K's decay continued; float64 `(N,)`, NaN if unmodelled.

    The top-K shows how fast the probabilities fall near rank K: the local power-law exponent `a`, fitted by least
    squares to `log p_r` against `log r` over ranks K/4..K. The tail continues from `p_K` as `p_K (r / K)^-a`, and must
    then hold exactly the tail mass m:

    - if it holds more, the decay steepens with rank as a Gaussian-logit tail's does: `p_K exp(-a L - b G(L))`, with
      `L = log(r / K)`, `G` from `_tail_rank_bins` and `b >= 0` solved for the mass (Newton's method: the log of the
      mass is convex in `b`, so the steps approach the root from one side). Exact on a Zipf tail (`b = 0`), and on
      Gaussian logits up to the noise of `a` (a sample's top ranks scatter around their expected decay);
    - if it holds less, the decay hides a heavier tail beyond it, and the missing mass is spread evenly over the
      V - K tail tokens (the most even tail the mass allows), as over a flat floor of unlikely tokens.

    No tail token is then likelier than `p_K` (`a, b >= 0`), except by the floor's share in the second case, which the
    bounds' clamp in `estimate_teacher_entropy` answers for. Rows with a zero probability in the top-K or no tail mass
    are left to the bounds (NaN), as is everything when there is no tail.
    """
    top_k = log_probs.size(-1)
    tail_tokens = vocab_size - top_k
    modelled = torch.isfinite(log_probs).all(-1) & (tail_mass > 0)
    if tail_tokens < 1 or top_k < 1 or not bool(modelled.any()):
        return torch.full_like(tail_mass, math.nan)
    log_probs = torch.where(modelled[:, None], log_probs, torch.zeros_like(log_probs))  # placeholders, dropped below
    mass = torch.where(modelled, tail_mass, torch.ones_like(tail_mass))[:, None]
    if top_k >= 2:
        first = min(top_k // 4, top_k - 2)  # index of rank first + 1, the first rank fitted
        log_ranks = torch.arange(first + 1, top_k + 1, dtype=torch.float64, device=log_probs.device).log()
        centred = log_ranks - log_ranks.mean()
        fitted = log_probs[:, first:]
        exponent = -((fitted - fitted.mean(-1, keepdim=True)) * centred).sum(-1, keepdim=True) / centred.square().sum()
        exponent = exponent.clamp_min(0.0)
    else:
        exponent = torch.zeros_like(mass)
    log_counts, log_rank, steepening = _tail_rank_bins(top_k, vocab_size, log_probs.device)
    log_p_k = log_probs[:, -1:]
    target = mass.log() - log_p_k  # the tail mass, in units of p_K, as a log
    log_bins = log_counts - exponent * log_rank  # the continued power law's mass per bin, in units of p_K
    steep = torch.logsumexp(log_bins, -1, keepdim=True) >= target
    curvature = torch.zeros_like(mass)
    for _ in range(_DECAY_NEWTON_STEPS):
        bins = log_bins - curvature * steepening
        total = torch.logsumexp(bins, -1, keepdim=True)
        derivative = ((bins - total).exp() * steepening).sum(-1, keepdim=True)  # -d total / d curvature
        step = torch.where(steep, (total - target).clamp_min(0.0) / derivative.clamp_min(1e-300), 0.0)
        curvature += step
        if not bool((step > 1e-12).any()):
            break
    log_token = log_p_k - exponent * log_rank - curvature * steepening  # one tail token's log-probability, per bin
    counts = log_counts.exp()
    continued = (counts * log_token.exp()).sum(-1, keepdim=True)
    floor = torch.where(steep, 0.0, (mass - continued).clamp_min(0.0) / tail_tokens)
    token = log_token.exp() + floor
    token = token * (mass / (counts * token).sum(-1, keepdim=True))  # the mass exactly, whatever the rounding
    entropy = -(counts * torch.special.xlogy(token, token)).sum(-1)
    return torch.where(modelled, entropy, math.nan)


def estimate_teacher_entropy(
    top_log_probs: Tensor, vocab_size: int, estimate: str = DEFAULT_ENTROPY_ESTIMATE
) -> Tensor:
    """The teacher-entropy estimate behind the served-teacher gate (float64, `(N,)`).

    `"decay"` (the default) continues the top-K's decay into the tail (`_decayed_tail_entropy`) and clamps the result
    into `teacher_entropy_bounds`, falling back to their midpoint where the tail cannot be modelled; `"midpoint"`,
    `"lower"` and `"upper"` are the bounds' midpoint and the bounds; `"top_k"` ignores the tail.
    """
    if estimate not in ENTROPY_ESTIMATES:
        raise ValueError(f"`entropy_estimate` must be one of {ENTROPY_ESTIMATES}; got {estimate!r}.")
    lower, upper, top_k_entropy, tail_mass = teacher_entropy_bounds(top_log_probs, vocab_size)
    midpoint = (lower + upper) / 2
    if estimate == "decay":
        modelled = top_k_entropy + _decayed_tail_entropy(top_log_probs.double(), tail_mass, vocab_size)
        return torch.where(modelled.isnan(), midpoint, torch.minimum(torch.maximum(modelled, lower), upper))
    return {"midpoint": midpoint, "lower": lower, "upper": upper, "top_k": top_k_entropy}[estimate]


def teacher_gate(entropy: Tensor, lower: Tensor, upper: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """The gate (float32 1.0 where `entropy > threshold`) and where the bounds leave it to the estimate (bool).

    `entropy` is the estimate, or the exact entropy where the server gives it. A token is ambiguous when its bounds
    straddle the threshold (`lower <= threshold < upper`): the exact gate could then be either, whatever the estimate.
    """
    return (entropy > threshold).to(torch.float32), (lower <= threshold) & (upper > threshold)


@dataclass(frozen=True)
class _Served:
    """The teacher's side of a chunk loop: everything already per token, nothing vocabulary-sized."""

    top_log_probs: Tensor  # (N, k), the forward KL's support, sorted by rank
    top_ids: Tensor  # (N, k)
    target_log_probs: Tensor  # (N,)
    gate: Tensor  # (N,) float32, 1.0 where the (estimated) entropy is above the threshold
    ambiguous: Tensor  # (N,) float32, 1.0 where the entropy bounds straddle the threshold
    entropy: Tensor  # (N,) float32, the entropy behind the gate
    tail_mass: Tensor  # (N,) float32


def _renormalised_top_k(top_log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """p~ and log p~ over the top-k, with zero-probability entries (-inf) kept at exactly 0 in p~."""
    log_renormalised = F.log_softmax(top_log_probs, dim=-1)
    return log_renormalised.exp(), log_renormalised


def _served_chunks(student_hidden, student_weight, student_bias, served: _Served, targets, opts: _Options,
                   divisor: float, chunk_size: int, needs_grad, target_log_probs_out=None,
                   importance: ImportanceCorrection | None = None):  # fmt: skip
    """Loss, statistic sums and (optionally) the student's gradients, a chunk of tokens at a time."""
    device = student_hidden.device
    num_tokens, vocab_size = targets.numel(), student_weight.size(0)
    need_any = any(needs_grad)

    per_token = torch.zeros((num_tokens, _NUM_COLUMNS), dtype=torch.float32, device=device)
    grad_hidden, grad_weight, grad_bias = _zero_student_gradients(student_hidden, student_weight, student_bias,
                                                                  needs_grad)  # fmt: skip
    rows = min(chunk_size, num_tokens)
    logits_buffer = torch.empty(rows, vocab_size, dtype=torch.float32, device=device)
    log_probs_buffer = torch.empty_like(logits_buffer)
    softcap_derivative_buffer = (
        torch.empty_like(logits_buffer) if need_any and opts.student_softcap is not None else None
    )
    grad_scale = opts.student_logit_scale / opts.temperature / divisor

    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        n = end - start
        probs, log_probs = logits_buffer[:n], log_probs_buffer[:n]
        softcap_derivative = None if softcap_derivative_buffer is None else softcap_derivative_buffer[:n]
        student_rows = student_hidden[start:end]
        _project_into(probs, student_rows, student_weight, student_bias)
        _scale_into_tempered_logits(
            probs, opts.student_logit_scale, opts.student_softcap, opts.temperature, softcap_derivative
        )
        log_softmax_into(log_probs, probs)
        torch.exp(log_probs, out=probs)

        sampled_ids = targets[start:end].unsqueeze(-1)
        target_log_probs = log_probs.gather(-1, sampled_ids).squeeze(-1)
        if target_log_probs_out is not None:
            target_log_probs_out[start:end] = target_log_probs
        sampled_log_ratio = target_log_probs - served.target_log_probs[start:end]
        top_ids = served.top_ids[start:end]
        top_teacher_probs, top_teacher_log_probs = _renormalised_top_k(served.top_log_probs[start:end])
        # 0 * log 0 is 0 on the teacher's side; only the student's log q at those ids can be used as is.
        forward = top_teacher_probs * (top_teacher_log_probs - log_probs.gather(-1, top_ids))
        forward = torch.where(top_teacher_probs > 0, forward, torch.zeros_like(forward)).sum(-1)
        student_entropy = -_row_dots(probs, log_probs)
        gate = served.gate[start:end]
        base_weight = torch.ones_like(gate) if opts.gate == "augment" else 1.0 - gate
        if importance is not None:
            base_weight = base_weight * importance.ratios(target_log_probs, start, end)

        stats = per_token[start:end]
        stats[:, _TEACHER_ENTROPY_ESTIMATE] = served.entropy[start:end]
        stats[:, _TEACHER_TAIL_MASS] = served.tail_mass[start:end]
        stats[:, _STUDENT_ENTROPY] = student_entropy
        stats[:, _SAMPLED_REVERSE_KL] = sampled_log_ratio
        stats[:, _FORWARD_KL_TOP_K] = forward
        stats[:, _FORWARD_KL_TOP_K_GATED] = forward * gate
        stats[:, _GATE] = gate
        stats[:, _BASE_USED] = base_weight * sampled_log_ratio
        stats[:, _FORWARD_USED] = gate * forward
        stats[:, _LOSS] = stats[:, _BASE_USED] + opts.forward_kl_coef * stats[:, _FORWARD_USED]
        stats[:, _STUDENT_HIGH_MONITOR] = student_entropy > opts.monitor_entropy_threshold
        stats[:, _TEACHER_HIGH_MONITOR_ESTIMATE] = served.entropy[start:end] > opts.monitor_entropy_threshold
        stats[:, _GATE_AMBIGUOUS] = served.ambiguous[start:end]

        if need_any:
            # The chunked loss's closed-form gradient, fed with the served terms: the sampled estimate and the top-k
            # forward KL need only q, the sampled ids and p~ at the teacher's ids (never the teacher's p itself).
            terms = _ChunkTerms(
                student_probs=probs,
                teacher_probs=None,
                log_ratio=log_probs,  # overwritten with the gradient
                teacher_entropy=served.entropy[start:end],
                student_entropy=student_entropy,
                reverse_kl=None,
                forward_kl=None,
                gate=gate,
                base_weight=base_weight,
                base=sampled_log_ratio,
                forward=forward,
                target_log_probs=target_log_probs,
                sampled_ids=sampled_ids,
                sampled_log_ratio=sampled_log_ratio,
                top_ids=top_ids,
                top_teacher_probs=top_teacher_probs,
            )
            grad = _student_logit_gradient(terms, opts, top_ids.size(-1), softcap_derivative)
            _add_projection_gradients(
                grad, student_rows, student_weight, None if grad_hidden is None else grad_hidden[start:end],
                grad_weight, grad_bias, grad_scale,
            )  # fmt: skip

    sums = per_token.sum(0)
    return sums[_LOSS] / divisor, sums, grad_hidden, grad_weight, grad_bias


class _ServedTeacherEOPDFunction(torch.autograd.Function):
    """Autograd wrapper like the chunked loss's: the forward computes the student's gradients, backward rescales."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, served, targets, opts, divisor, chunk_size,
                target_log_probs_out, importance):  # fmt: skip
        needs_grad = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            student_bias is not None and ctx.needs_input_grad[2],
        )
        loss, sums, *grads = _served_chunks(
            student_hidden, student_weight, student_bias, served, targets, opts, divisor, chunk_size, needs_grad,
            target_log_probs_out, importance,
        )  # fmt: skip
        grads = [
            None if grad is None else grad.to(like.dtype)
            for grad, like in zip(grads, (student_hidden, student_weight, student_bias))
        ]
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, grad_sums):
        # The chunked loss's rescaling of the saved gradients, then no gradient for the six other inputs.
        student_grads = _ChunkedEOPDFunction.backward(ctx, grad_loss, grad_sums)[:3]
        return (*student_grads, None, None, None, None, None, None, None)


def served_teacher_eopd_loss_and_stats(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    teacher_top_log_probs: Tensor,
    teacher_top_ids: Tensor,
    teacher_target_log_probs: Tensor,
    *,
    student_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    vocab_size: int | None = None,
    options: EOPDLossOptions | None = None,
    entropy_estimate: str = DEFAULT_ENTROPY_ESTIMATE,
    teacher_entropy: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 256,
    target_log_probs_out: Tensor | None = None,
    importance: ImportanceCorrection | None = None,
    **option_overrides,
) -> tuple[Tensor, ServedTeacherStats]:
    """EOPD loss and statistics from the student's hidden states and a served teacher's top log-probabilities.

    The loss is [`eopd_loss_and_stats`]'s with `reverse_kl_estimator="sampled"`, `temperature=1.0` and an integer
    `forward_kl_top_k`, except that the gate uses an estimate of the teacher's entropy (see the module docstring).
    Where the estimated gate equals the exact one, value and student gradients are the same. The student's side is
    computed a chunk at a time, as in [`chunked_eopd_loss_and_stats`].

    Args:
        student_hidden (`torch.Tensor`):
            Student last hidden states `(N, H)` at the loss positions, row `i` predicting `targets[i]`.
        student_weight (`torch.Tensor`):
            Student output projection `(V, H)`.
        targets (`torch.Tensor`):
            The sampled token ids `(N,)`.
        teacher_top_log_probs (`torch.Tensor`):
            The teacher's top-K log-probabilities `(N, K)`, sorted by rank, -inf for zero probabilities; K >=
            `forward_kl_top_k`. All K enter the entropy estimate; the first `forward_kl_top_k` the forward KL.
        teacher_top_ids (`torch.Tensor`):
            Their token ids `(N, K)`.
        teacher_target_log_probs (`torch.Tensor`):
            The teacher's log-probability of each target token `(N,)`, whatever its rank.
        student_bias (`torch.Tensor`, *optional*):
            Bias of the student's output projection `(V,)`.
        student_logit_scale (`float`, *optional*, defaults to `1.0`):
            Factor applied to the student's projection before the softcap.
        student_softcap (`float`, *optional*):
            If set, the student's logits are `c * tanh(logits / c)`.
        vocab_size (`int`, *optional*):
            The teacher's vocabulary size V for the entropy's upper bound; defaults to the student's `V`.
        options ([`EOPDLossOptions`], *optional*):
            The loss options; defaults to the paper's with `reverse_kl_estimator="sampled"`, the only base term a
            served teacher gives exactly. `beta` and `temperature` must be 1 and `forward_kl_top_k` an integer (the
            size of the teacher's renormalised support in the forward KL).
        entropy_estimate (`str`, *optional*, defaults to `"decay"`):
            The gate's entropy estimate, one of `ENTROPY_ESTIMATES`: `"decay"` (the top-K's decay continued into the
            tail, clamped into the bounds), `"midpoint"` of the bounds, `"lower"`, `"upper"`, or `"top_k"` (the top-K
            entropy, ignoring the tail). See [`estimate_teacher_entropy`].
        teacher_entropy (`torch.Tensor`, *optional*):
            The exact teacher entropy `(N,)`, when known (a server with trl-eopd's vLLM plugin, tests): the gate then
            uses it instead of an estimate, and the statistics name it exact.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Divisor for the summed loss; defaults to `max(N, 1)`. 0 gives 0.
        chunk_size (`int`, *optional*, defaults to `256`):
            Tokens projected to the vocabulary at once.
        target_log_probs_out (`torch.Tensor`, *optional*):
            A float32 `(N,)` tensor that receives the student's log-probability of each target token (detached), as
            with [`chunked_eopd_loss_and_stats`].
        importance ([`ImportanceCorrection`], *optional*):
            For tokens sampled by older weights: each token's sampled reverse-KL term is weighted by its truncated
            importance ratio (see `trl_eopd/loss/importance.py`).
        **option_overrides:
            Any field of [`EOPDLossOptions`] by name, replacing its value in `options`.

    Returns:
        `tuple[torch.Tensor, ServedTeacherStats]`: the scalar float32 loss and the detached statistics.
    """
    loss_options = EOPDLossOptions.resolve(
        options if options is not None else EOPDLossOptions(reverse_kl_estimator="sampled"), option_overrides
    )
    # What the served log-probs determine exactly (trl_eopd/teacher_server.py refuses the rest in the config).
    if loss_options.forward_kl_top_k is None:
        raise ValueError("`forward_kl_top_k` must be an integer: a served teacher only gives its top log-probs.")
    for name, required in (("reverse_kl_estimator", "sampled"), ("beta", 1.0), ("temperature", 1.0)):
        if getattr(loss_options, name) != required:
            raise ValueError(
                f"`{name}` must be {required!r} with a served teacher (got {getattr(loss_options, name)!r}): the "
                "other settings need the teacher's full distribution."
            )
    forward_kl_top_k = loss_options.forward_kl_top_k
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an integer >= 1; got {chunk_size!r}.")
    num_tokens, fetched = targets.numel(), teacher_top_log_probs.size(-1)
    shapes = (student_hidden.shape, teacher_top_log_probs.shape, teacher_top_ids.shape, teacher_target_log_probs.shape)
    if (
        targets.dim() != 1
        or student_hidden.dim() != 2
        or teacher_top_log_probs.dim() != 2
        or teacher_top_ids.shape != teacher_top_log_probs.shape
        or teacher_target_log_probs.shape != targets.shape
        or student_hidden.size(0) != num_tokens
        or teacher_top_log_probs.size(0) != num_tokens
    ):
        raise ValueError(
            f"Expected `student_hidden` (N, H), `teacher_top_log_probs` and `teacher_top_ids` (N, K), "
            f"`teacher_target_log_probs` and `targets` (N,); got {[tuple(s) for s in shapes]} and "
            f"{tuple(targets.shape)}."
        )
    if teacher_entropy is not None and teacher_entropy.shape != targets.shape:
        raise ValueError(
            f"Expected `teacher_entropy` (N,) like `targets`; got {tuple(teacher_entropy.shape)} and "
            f"{tuple(targets.shape)}."
        )
    vocab_size = student_weight.size(0) if vocab_size is None else int(vocab_size)
    top_k = min(forward_kl_top_k, vocab_size)
    if fetched < top_k:
        raise ValueError(
            f"The teacher's top log-probs hold {fetched} entries per token, fewer than `forward_kl_top_k={top_k}`."
        )
    divisor = float(num_items_in_batch) if num_items_in_batch is not None else float(max(num_tokens, 1))
    if not math.isfinite(divisor) or divisor < 0:
        raise ValueError(f"`num_items_in_batch` must be a finite number >= 0; got {num_items_in_batch!r}.")
    divisor = divisor or 1.0  # a window without loss tokens: keep its 0 loss, not 0 / 0

    opts = _Options(
        **{name: getattr(loss_options, name) for name in EOPDLossOptions.names() if name != "forward_kl_top_k"},
        forward_kl_top_k=top_k,
        student_logit_scale=float(student_logit_scale),
        student_softcap=None if student_softcap is None else float(student_softcap),
    )
    device = student_hidden.device
    with torch.no_grad():
        lower, upper, _, tail_mass = teacher_entropy_bounds(teacher_top_log_probs.detach(), vocab_size)
        num_exact = num_tokens if teacher_entropy is not None else 0
        if teacher_entropy is None:
            teacher_entropy = estimate_teacher_entropy(teacher_top_log_probs.detach(), vocab_size, entropy_estimate)
        entropy = teacher_entropy.detach().to(device, torch.float32)
        gate, ambiguous = teacher_gate(entropy, lower.to(device), upper.to(device), opts.entropy_threshold)
        if num_exact:
            # An exact entropy leaves nothing of the gate to the estimate, whatever the bounds say.
            ambiguous = torch.zeros_like(ambiguous)
        served = _Served(
            top_log_probs=teacher_top_log_probs.detach()[:, :top_k].to(device, torch.float32),
            top_ids=teacher_top_ids[:, :top_k].to(device, torch.long),
            target_log_probs=teacher_target_log_probs.detach().to(device, torch.float32),
            gate=gate,
            ambiguous=ambiguous.to(torch.float32),
            entropy=entropy,
            tail_mass=tail_mass.to(device, torch.float32),
        )
    student_tensors = [t for t in (student_hidden, student_weight, student_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in student_tensors):
        loss, sums = _ServedTeacherEOPDFunction.apply(
            student_hidden,
            student_weight,
            student_bias,
            served,
            targets,
            opts,
            divisor,
            chunk_size,
            target_log_probs_out,
            importance,
        )
    else:
        with torch.no_grad():
            loss, sums, *_ = _served_chunks(
                student_hidden, student_weight, student_bias, served, targets, opts, divisor, chunk_size,
                (False, False, False), target_log_probs_out, importance,
            )  # fmt: skip

    def count(column):
        return sums[column].round().to(torch.int64)

    stats = ServedTeacherStats(
        num_tokens=torch.tensor(num_tokens, dtype=torch.int64, device=device),
        num_high_entropy=count(_GATE),
        teacher_entropy_estimate=sums[_TEACHER_ENTROPY_ESTIMATE],
        teacher_tail_mass=sums[_TEACHER_TAIL_MASS],
        student_entropy=sums[_STUDENT_ENTROPY],
        sampled_reverse_kl=sums[_SAMPLED_REVERSE_KL],
        forward_kl_top_k=sums[_FORWARD_KL_TOP_K],
        forward_kl_top_k_high_entropy=sums[_FORWARD_KL_TOP_K_GATED],
        loss_base=sums[_BASE_USED],
        loss_forward=sums[_FORWARD_USED],
        num_student_high_entropy_monitor=count(_STUDENT_HIGH_MONITOR),
        num_teacher_high_entropy_monitor_estimate=count(_TEACHER_HIGH_MONITOR_ESTIMATE),
        num_exact_entropy=torch.tensor(num_exact, dtype=torch.int64, device=device),
        num_gate_ambiguous=count(_GATE_AMBIGUOUS),
    )
    return loss, stats
