"""The served-teacher loss, fed a local teacher's top-k, must equal the local-teacher loss wherever the gates agree.

No server here: the teacher's top-K log-probabilities, ids and sampled-token log-probabilities are computed in float64
from local teacher logits, exactly what a vLLM server returns (see tests/vllm_engine/test_teacher_server.py for the
same check against a real server).
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference_eopd_loss, reference_sampled_gradient

from trl_eopd.loss import eopd_loss_and_stats
from trl_eopd.loss.served import (
    estimate_teacher_entropy,
    served_teacher_eopd_loss_and_stats,
    teacher_entropy_bounds,
)

N, V, H = 41, 89, 12


def make_case(seed=0, n=N, fetched=24, bias=False):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, H, generator=generator)
    student_weight = torch.randn(V, H, generator=generator) * 0.5
    student_bias = torch.randn(V, generator=generator) * 0.3 if bias else None
    # Per-token scales spread the teacher's entropies on both sides of the 0.8-nat threshold.
    scales = torch.rand(n, 1, generator=generator, dtype=torch.float64) * 6.0 + 0.3
    teacher_logits = torch.randn(n, V, generator=generator, dtype=torch.float64) * scales
    targets = torch.randint(0, V, (n,), generator=generator)
    teacher_log_probs = teacher_logits.log_softmax(-1)
    top_log_probs, top_ids = teacher_log_probs.topk(fetched, dim=-1)
    exact_entropy = -(teacher_log_probs.exp() * teacher_log_probs).sum(-1)
    return {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "student_bias": student_bias,
        "teacher_logits": teacher_logits,
        "targets": targets,
        "top_log_probs": top_log_probs.float(),
        "top_ids": top_ids,
        "target_log_probs": teacher_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float(),
        "exact_entropy": exact_entropy,
    }


def student_logits(case, hidden=None, weight=None):
    hidden = case["student_hidden"] if hidden is None else hidden
    weight = case["student_weight"] if weight is None else weight
    logits = hidden @ weight.t()
    return logits if case["student_bias"] is None else logits + case["student_bias"]


def served(case, rows=None, **options):
    rows = slice(None) if rows is None else rows
    hidden = case["student_hidden"][rows].clone().requires_grad_(True)
    weight = case["student_weight"].clone().requires_grad_(True)
    options.setdefault("chunk_size", 7)  # several chunks, the last one short
    loss, stats = served_teacher_eopd_loss_and_stats(
        hidden, weight, case["targets"][rows], case["top_log_probs"][rows], case["top_ids"][rows],
        case["target_log_probs"][rows], student_bias=case["student_bias"], **options,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), stats, hidden.grad, weight.grad


def local(case, rows=None, forward_kl_top_k=16, **options):
    rows = slice(None) if rows is None else rows
    hidden = case["student_hidden"][rows].clone().requires_grad_(True)
    weight = case["student_weight"].clone().requires_grad_(True)
    loss, stats = eopd_loss_and_stats(
        student_logits(case, hidden, weight).unsqueeze(0), case["teacher_logits"][rows].float().unsqueeze(0),
        case["targets"][rows].unsqueeze(0), reverse_kl_estimator="sampled", forward_kl_top_k=forward_kl_top_k,
        **options,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), stats, hidden.grad, weight.grad


def float64_reference_gradient(case, forward_kl_top_k=16, entropy_threshold=0.8):
    """d(loss)/d(student logits) in float64 from tests/reference.py: the sampled term's policy gradient plus the gated
    top-k forward KL's gradient (the reference's value-only sampled base is removed by a difference)."""
    logits = student_logits(case).double().detach()
    teacher, labels = case["teacher_logits"].unsqueeze(0), case["targets"].unsqueeze(0)

    def autograd(threshold):
        leaf = logits.clone().unsqueeze(0).requires_grad_(True)
        reference_eopd_loss(leaf, teacher, labels, reverse_kl_estimator="sampled", forward_kl_top_k=forward_kl_top_k,
                            entropy_threshold=threshold).backward()  # fmt: skip
        return leaf.grad[0]

    forward_part = autograd(entropy_threshold) - autograd(math.inf)
    return reference_sampled_gradient(logits.unsqueeze(0), teacher, labels)[0] + forward_part


@pytest.mark.parametrize("forward_kl_top_k", [1, 16, 24])
def test_exact_gate_equals_the_float64_reference(forward_kl_top_k):
    case = make_case()
    loss, stats, grad_hidden, grad_weight = served(
        case, forward_kl_top_k=forward_kl_top_k, teacher_entropy=case["exact_entropy"]
    )
    expected = reference_eopd_loss(
        student_logits(case).double().unsqueeze(0), case["teacher_logits"].unsqueeze(0), case["targets"].unsqueeze(0),
        reverse_kl_estimator="sampled", forward_kl_top_k=forward_kl_top_k,
    )  # fmt: skip
    assert 0 < int(stats.num_high_entropy) < N  # both gate branches are exercised
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    logit_grad = float64_reference_gradient(case, forward_kl_top_k=forward_kl_top_k)
    expected_hidden = logit_grad @ case["student_weight"].double()
    torch.testing.assert_close(grad_hidden.double(), expected_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight.double(), logit_grad.t() @ case["student_hidden"].double(), rtol=1e-4,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("bias", [False, True])
def test_exact_gate_equals_the_local_teacher_loss_and_stats(gate, bias):
    case = make_case(seed=1, bias=bias)
    loss, stats, grad_hidden, grad_weight = served(
        case, gate=gate, forward_kl_coef=0.7, teacher_entropy=case["exact_entropy"], num_items_in_batch=60
    )
    ref_loss, ref_stats, ref_hidden, ref_weight = local(case, gate=gate, forward_kl_coef=0.7, num_items_in_batch=60)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-4, atol=1e-6)
    assert int(stats.num_high_entropy) == int(ref_stats.num_high_entropy)
    torch.testing.assert_close(stats.loss_base, ref_stats.loss_base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.loss_forward, ref_stats.loss_forward, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.student_entropy, ref_stats.student_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.teacher_entropy_estimate.double(), case["exact_entropy"].sum(), rtol=1e-5, atol=0)


def test_estimated_gate_equals_the_local_loss_on_the_tokens_where_the_gates_agree():
    case = make_case(seed=2)
    estimate = estimate_teacher_entropy(case["top_log_probs"], V)
    agree = (estimate > 0.8) == (case["exact_entropy"] > 0.8)
    assert agree.float().mean() > 0.8  # a synthetic teacher; the real teachers' agreement is measured elsewhere
    rows = agree.nonzero().squeeze(-1)
    loss, _, grad_hidden, grad_weight = served(case, rows=rows)
    ref_loss, _, ref_hidden, ref_weight = local(case, rows=rows)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-4, atol=1e-6)


def test_entropy_bounds_hold_and_are_exact_when_everything_is_fetched():
    case = make_case(seed=3, fetched=24)
    lower, upper, top_k_entropy, tail_mass = teacher_entropy_bounds(case["top_log_probs"].double(), V)
    exact = case["exact_entropy"]
    assert (lower <= exact + 1e-6).all() and (exact <= upper + 1e-6).all()
    assert (top_k_entropy <= lower + 1e-12).all() and (tail_mass > 0).all()
    # At least the bound with the whole tail on one token, and strictly tighter for some tokens.
    one_token = top_k_entropy - tail_mass * tail_mass.log()
    assert (lower >= one_token - 1e-12).all() and (lower > one_token + 1e-3).any()
    # Tight: the most concentrated tail the ranking allows is a real distribution, whose entropy is the bound.
    row = 0
    p = case["top_log_probs"][row].double().exp()
    m, p_k = 1 - p.sum(), p[-1]
    tail = torch.cat([p_k.repeat(int(m // p_k)), (m - (m // p_k) * p_k).reshape(1)])
    whole = torch.cat([p, tail])
    torch.testing.assert_close(lower[row], -(whole * whole.log()).sum(), rtol=0, atol=1e-9)
    whole = make_case(seed=3, fetched=V)
    lower, upper, _, tail_mass = teacher_entropy_bounds(whole["top_log_probs"].double(), V)
    torch.testing.assert_close(lower, whole["exact_entropy"], rtol=0, atol=1e-5)
    torch.testing.assert_close(upper, whole["exact_entropy"], rtol=0, atol=1e-5)


def test_a_zero_probability_in_the_top_k_is_handled():
    case = make_case(seed=4, n=5)
    case["top_log_probs"][:, -3:] = -math.inf  # what a -9999 from vLLM becomes
    loss, stats, grad_hidden, _ = served(case, forward_kl_top_k=24)
    assert torch.isfinite(loss) and torch.isfinite(grad_hidden).all() and torch.isfinite(stats.to_tensor()).all()


def test_no_grad_and_empty_batches():
    case = make_case(seed=5)
    with torch.no_grad():
        loss, _ = served_teacher_eopd_loss_and_stats(
            case["student_hidden"], case["student_weight"], case["targets"], case["top_log_probs"], case["top_ids"],
            case["target_log_probs"],
        )  # fmt: skip
    assert torch.isfinite(loss)
    empty = {key: value[:0] if torch.is_tensor(value) and key != "student_weight" else value
             for key, value in case.items()}  # fmt: skip
    loss, stats, _, grad_weight = served(empty, num_items_in_batch=0)
    assert float(loss) == 0.0 and int(stats.num_tokens) == 0 and float(grad_weight.abs().sum()) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(forward_kl_top_k=25), r"hold 24 entries per token, fewer than `forward_kl_top_k=25`"),
        (dict(forward_kl_top_k=None), r"`forward_kl_top_k` must be an integer"),
        (dict(entropy_estimate="mean"), r"`entropy_estimate` must be one of"),
        (dict(chunk_size=0), r"`chunk_size` must be an integer >= 1"),
        (dict(teacher_entropy=torch.ones(3)), r"Expected `teacher_entropy` \(N,\) like `targets`; got \(3,\)"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    case = make_case(seed=6, n=4)
    with pytest.raises(ValueError, match=message):
        served(case, **kwargs)


def test_the_students_target_log_probs_are_handed_back():
    case = make_case(seed=7)
    out = torch.empty(N, dtype=torch.float32)
    served(case, target_log_probs_out=out)
    expected = student_logits(case).double().log_softmax(-1).gather(-1, case["targets"][:, None])[:, 0]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_the_statistics_name_the_entropy_exact_only_when_it_was_given():
    """A server with trl-eopd's vLLM plugin gives the exact entropy: then its metrics drop the `_estimate` names."""
    case = make_case(seed=8)
    exact = case["exact_entropy"]
    _, with_exact, _, _ = served(case, teacher_entropy=exact.float(), monitor_entropy_threshold=1.5)
    _, estimated, _, _ = served(case, monitor_entropy_threshold=1.5)
    means = with_exact.means()
    assert means["eopd/teacher_entropy_exact"] == 1.0 and estimated.means()["eopd/teacher_entropy_exact"] == 0.0
    assert means["eopd/teacher_entropy"] == pytest.approx(float(exact.mean()), rel=1e-6)
    assert means["eopd/monitor/teacher_high_entropy_ratio"] == pytest.approx(float((exact > 1.5).double().mean()))
    assert means["eopd/high_entropy_ratio"] == pytest.approx(float((exact > 0.8).double().mean()))
    assert not any(name.endswith("_estimate") for name in means)
    estimate = estimate_teacher_entropy(case["top_log_probs"], V)
    assert estimated.means()["eopd/teacher_entropy_estimate"] == pytest.approx(float(estimate.mean()), rel=1e-6)
    assert "eopd/teacher_entropy" not in estimated.means()
    # Summed over processes and steps as the trainer does (one packed vector), the names survive.
    packed = with_exact.to_tensor() + with_exact.to_tensor()
    assert type(with_exact).from_tensor(packed).means()["eopd/teacher_entropy_exact"] == 1.0
