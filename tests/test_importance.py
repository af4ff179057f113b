"""Stale samples: each token's sampled reverse-KL term weighted by min(q(y) / q_sampler(y), cap), in every loss path.

The expected loss and gradient are built in float64 from tests/reference.py, which shares no code with the package:
the forward-KL part by autograd through the reference, the weighted policy gradient of the sampled term by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import _distribution, reference_per_token

from trl_eopd.loss import ImportanceCorrection, chunked_eopd_loss_and_stats, eopd_loss_and_stats
from trl_eopd.loss.served import served_teacher_eopd_loss_and_stats

N, V, H = 29, 53, 12
CAP = 2.0


def make_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64) * 0.5
    # Per-token scales put the teacher's entropies on both sides of the 0.8-nat threshold.
    scales = torch.rand(N, 1, generator=generator, dtype=torch.float64) * 6.0 + 0.3
    teacher_logits = torch.randn(N, V, generator=generator, dtype=torch.float64) * scales
    targets = torch.randint(0, V, (N,), generator=generator)
    # The sampler's log-prob of each token: the current one moved by up to +-1.5 nats, so that some ratios pass the
    # cap and others are far below 1; three tokens have none (NaN: weight 1).
    shift = (torch.rand(N, generator=generator, dtype=torch.float64) - 0.5) * 3.0
    return {"hidden": hidden, "weight": weight, "teacher_logits": teacher_logits, "targets": targets, "shift": shift}


def sampler_log_probs(case, temperature):
    logits = case["hidden"] @ case["weight"].t()
    current = torch.stack([_distribution(logits[i], temperature)[1][case["targets"][i]] for i in range(N)])
    sampler = (current - case["shift"]).float()
    sampler[[2, 11, 20]] = math.nan
    return sampler


def reference(case, sampler, *, temperature, gate, forward_kl_top_k):
    """Weighted loss and its gradient w.r.t. the student's logits, in float64."""
    logits = (case["hidden"] @ case["weight"].t()).detach().requires_grad_(True)
    options = {"entropy_threshold": 0.8, "gate": gate, "beta": 1.0, "temperature": temperature,
               "forward_kl_top_k": forward_kl_top_k, "reverse_kl_estimator": "sampled"}  # fmt: skip
    value = torch.zeros((), dtype=torch.float64)
    forward_parts = torch.zeros((), dtype=torch.float64)
    sampled_gradient = torch.zeros(N, V, dtype=torch.float64)
    ratios = []
    for i in range(N):
        label = int(case["targets"][i])
        total, _, g = reference_per_token(logits[i], case["teacher_logits"][i], label, forward_kl_coef=1.0, **options)
        base, _, _ = reference_per_token(logits[i], case["teacher_logits"][i], label, forward_kl_coef=0.0, **options)
        q, log_q = _distribution(logits[i].detach(), temperature)
        _, log_p = _distribution(case["teacher_logits"][i], temperature)
        ratio = 1.0 if math.isnan(sampler[i]) else min(math.exp(float(log_q[label]) - float(sampler[i])), CAP)
        ratios.append(ratio)
        value = value + ratio * base.detach() + (total - base).detach()
        forward_parts = forward_parts + (total - base)
        base_weight = 1.0 if gate == "augment" else 1.0 - g
        one_hot = torch.zeros(V, dtype=torch.float64)
        one_hot[label] = 1.0
        k = float(log_q[label] - log_p[label])
        sampled_gradient[i] = ratio * base_weight * k * (one_hot - q) / temperature
    (forward_gradient,) = torch.autograd.grad(forward_parts, logits)
    assert min(ratios) < 0.5 and ratios.count(CAP) >= 3  # the cap and small ratios are both exercised
    return value / N, (forward_gradient + sampled_gradient) / N


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("forward_kl_top_k", [None, 5])
def test_full_logits_loss_weights_the_sampled_term(gate, forward_kl_top_k):
    case = make_case()
    temperature = 1.3
    sampler = sampler_log_probs(case, temperature)
    expected_value, expected_gradient = reference(case, sampler, temperature=temperature, gate=gate,
                                                  forward_kl_top_k=forward_kl_top_k)  # fmt: skip
    logits = (case["hidden"] @ case["weight"].t()).float().requires_grad_(True)
    loss, _ = eopd_loss_and_stats(
        logits.unsqueeze(0), case["teacher_logits"].float().unsqueeze(0), case["targets"].unsqueeze(0),
        gate=gate, forward_kl_top_k=forward_kl_top_k, temperature=temperature, reverse_kl_estimator="sampled",
        importance=ImportanceCorrection(sampler, CAP),
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double(), expected_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), expected_gradient, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gate", ["augment", "switch"])
def test_chunked_loss_weights_the_sampled_term(gate):
    case = make_case(seed=1)
    temperature = 0.9
    sampler = sampler_log_probs(case, temperature)
    expected_value, expected_gradient = reference(case, sampler, temperature=temperature, gate=gate,
                                                  forward_kl_top_k=5)  # fmt: skip
    hidden = case["hidden"].float().requires_grad_(True)
    weight = case["weight"].float().requires_grad_(True)
    # The teacher as hidden states: the identity projection gives back its logits.
    loss, _ = chunked_eopd_loss_and_stats(
        hidden, weight, case["teacher_logits"].float(), torch.eye(V), case["targets"], gate=gate,
        forward_kl_top_k=5, temperature=temperature, reverse_kl_estimator="sampled", chunk_size=8,
        importance=ImportanceCorrection(sampler, CAP),
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double(), expected_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), expected_gradient @ case["weight"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), expected_gradient.t() @ case["hidden"], rtol=1e-4, atol=1e-6)


def test_served_teacher_loss_weights_the_sampled_term():
    case = make_case(seed=2)
    sampler = sampler_log_probs(case, 1.0)
    expected_value, expected_gradient = reference(case, sampler, temperature=1.0, gate="augment", forward_kl_top_k=5)
    teacher_log_probs = case["teacher_logits"].log_softmax(-1)
    # Every token's log-prob fetched: the served teacher is then exactly the local one.
    top_log_probs, top_ids = teacher_log_probs.topk(V, dim=-1)
    target_log_probs = teacher_log_probs.gather(-1, case["targets"].unsqueeze(-1)).squeeze(-1)
    hidden = case["hidden"].float().requires_grad_(True)
    weight = case["weight"].float().requires_grad_(True)
    loss, _ = served_teacher_eopd_loss_and_stats(
        hidden, weight, case["targets"], top_log_probs.float(), top_ids, target_log_probs.float(),
        teacher_entropy=-(teacher_log_probs.exp() * teacher_log_probs).sum(-1), forward_kl_top_k=5, chunk_size=7,
        importance=ImportanceCorrection(sampler, CAP),
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double(), expected_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), expected_gradient @ case["weight"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), expected_gradient.t() @ case["hidden"], rtol=1e-4, atol=1e-6)


def test_analytic_reverse_kl_takes_no_weight():
    case = make_case(seed=3)
    sampler = sampler_log_probs(case, 1.0)
    logits = (case["hidden"] @ case["weight"].t()).float().unsqueeze(0)
    inputs = (logits, case["teacher_logits"].float().unsqueeze(0), case["targets"].unsqueeze(0))
    weighted, _ = eopd_loss_and_stats(*inputs, importance=ImportanceCorrection(sampler, CAP))
    plain, _ = eopd_loss_and_stats(*inputs)
    assert torch.equal(weighted, plain)
