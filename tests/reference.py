"""An independent float64 implementation of the EOPD loss, written token by token from the paper (arXiv 2603.07079)
and the formula in the README's "How EOPD works" section.

It deliberately shares no code with `trl_eopd`: it loops over tokens, builds distributions with explicit
exp/normalise steps, and writes the generalized JSD from its definition, so a mistake in the package cannot hide in a
helper both sides call.
"""

from __future__ import annotations

import math

import torch


def _distribution(logits_row: torch.Tensor, temperature: float):
    scaled = logits_row.double() / temperature
    shifted = scaled - scaled.max()
    log_z = torch.log(torch.exp(shifted).sum())
    log_probs = shifted - log_z
    return torch.exp(log_probs), log_probs


def _kl(p, log_p, log_q):
    return (p * (log_p - log_q)).sum()


def _jsd(q, log_q, p, log_p, beta: float):
    if beta == 1.0:
        return _kl(q, log_q, log_p)
    if beta == 0.0:
        return _kl(p, log_p, log_q)
    m = beta * p + (1.0 - beta) * q
    log_m = torch.log(m)
    return beta * _kl(p, log_p, log_m) + (1.0 - beta) * _kl(q, log_q, log_m)


def reference_per_token(
    student_logits_row,
    teacher_logits_row,
    label: int,
    *,
    entropy_threshold,
    forward_kl_coef,
    gate,
    beta,
    temperature,
    forward_kl_top_k,
    reverse_kl_estimator,
):
    """Per-token loss value for one position, plus (entropy, gate) for inspection."""
    q, log_q = _distribution(student_logits_row, temperature)
    p, log_p = _distribution(teacher_logits_row, temperature)
    entropy = float(-(p * log_p).sum())
    g = 1.0 if entropy > entropy_threshold else 0.0

    if reverse_kl_estimator == "sampled":
        # The value of the sampled estimator is just log q(y) - log p(y).
        base = log_q[label] - log_p[label]
    else:
        base = _jsd(q, log_q, p, log_p, beta)

    if forward_kl_top_k is None:
        forward = _kl(p, log_p, log_q)
    else:
        k = min(forward_kl_top_k, p.numel())
        top_ids = torch.argsort(teacher_logits_row.double(), descending=True)[:k]
        top_scaled = teacher_logits_row.double()[top_ids] / temperature
        # log p_top from the logits, not log(p_top): a probability that underflows to 0 (a one-hot teacher) then
        # contributes 0, not 0 * -inf.
        log_p_top = top_scaled - top_scaled.max()
        log_p_top = log_p_top - torch.log(torch.exp(log_p_top).sum())
        p_top = torch.exp(log_p_top)
        forward = (p_top * (log_p_top - log_q[top_ids])).sum()

    if gate == "augment":
        loss = base + forward_kl_coef * g * forward
    else:
        loss = (1.0 - g) * base + forward_kl_coef * g * forward
    return loss, entropy, g


def reference_eopd_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    entropy_threshold=0.8,
    forward_kl_coef=1.0,
    gate="augment",
    beta=1.0,
    temperature=1.0,
    forward_kl_top_k=None,
    reverse_kl_estimator="analytic",
    num_items_in_batch=None,
):
    """Reduced loss in float64. Differentiable w.r.t. the logits for the analytic estimator."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    vocab = student_logits.shape[-1]
    flat_student = student_logits.reshape(-1, vocab)
    flat_teacher = teacher_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    for i in range(flat_labels.numel()):
        label = int(flat_labels[i])
        if label == -100:
            continue
        loss, _, _ = reference_per_token(
            flat_student[i],
            flat_teacher[i],
            label,
            entropy_threshold=entropy_threshold,
            forward_kl_coef=forward_kl_coef,
            gate=gate,
            beta=beta,
            temperature=temperature,
            forward_kl_top_k=forward_kl_top_k,
            reverse_kl_estimator=reverse_kl_estimator,
        )
        total = total + loss
        count += 1
    divisor = float(num_items_in_batch) if num_items_in_batch is not None else max(count, 1)
    return total / divisor


def reference_sampled_gradient(
    student_logits, teacher_logits, labels, *, temperature=1.0, entropy_threshold=math.inf, num_items_in_batch=None
):
    """Gradient of the sampled estimator w.r.t. the student logits, written out by hand (gate off).

    For each token: k * d log q(y) / dS_v = k * (1[v = y] - q_v) / temperature, with k = log q(y) - log p(y).
    """
    grad = torch.zeros_like(student_logits, dtype=torch.float64)
    vocab = student_logits.shape[-1]
    flat_grad = grad.reshape(-1, vocab)
    flat_student = student_logits.reshape(-1, vocab)
    flat_teacher = teacher_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    count = int((flat_labels != -100).sum())
    divisor = float(num_items_in_batch) if num_items_in_batch is not None else max(count, 1)
    for i in range(flat_labels.numel()):
        label = int(flat_labels[i])
        if label == -100:
            continue
        q, log_q = _distribution(flat_student[i], temperature)
        _, log_p = _distribution(flat_teacher[i], temperature)
        k = float(log_q[label] - log_p[label])
        one_hot = torch.zeros(vocab, dtype=torch.float64)
        one_hot[label] = 1.0
        flat_grad[i] = k * (one_hot - q) / temperature / divisor
    return grad
