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
    DEFAULT_ENTROPY_ESTIMATE,
    ENTROPY_ESTIMATES,
    ServedTeacherStats,
    estimate_teacher_entropy,
    served_teacher_eopd_loss_and_stats,
    teacher_entropy_bounds,
    teacher_gate,
)

N, V, H = 41, 89, 12


def make_case(seed=0, n=N, fetched=24, bias=False, scale_low=0.3, scale_span=6.0, peaks=None):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, H, generator=generator)
    student_weight = torch.randn(V, H, generator=generator) * 0.5
    student_bias = torch.randn(V, generator=generator) * 0.3 if bias else None
    # Per-token scales spread the teacher's entropies on both sides of the 0.8-nat threshold.
    scales = torch.rand(n, 1, generator=generator, dtype=torch.float64) * scale_span + scale_low
    teacher_logits = torch.randn(n, V, generator=generator, dtype=torch.float64) * scales
    if peaks is not None:  # one token per row raised by peaks[0] + [0, peaks[1]) over a flat tail
        lift = torch.rand(n, generator=generator, dtype=torch.float64) * peaks[1] + peaks[0]
        teacher_logits[torch.arange(n), torch.randint(0, V, (n,), generator=generator)] += lift
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
    # Every teacher-side metric taken from the estimate says so; the rest keep their names.
    renamed = {
        "eopd/teacher_entropy": "eopd/teacher_entropy_estimate",
        "eopd/monitor/teacher_high_entropy_ratio": "eopd/monitor/teacher_high_entropy_ratio_estimate",
    }
    assert set(estimated.means()) == {renamed.get(name, name) for name in means}
    assert estimated.means()["eopd/monitor/teacher_high_entropy_ratio_estimate"] == pytest.approx(
        float((estimate.float() > 1.5).double().mean())
    )
    # Summed over processes and steps as the trainer does (one packed vector), the names survive.
    packed = with_exact.to_tensor() + with_exact.to_tensor()
    assert type(with_exact).from_tensor(packed).means()["eopd/teacher_entropy_exact"] == 1.0


# ----------------------------------------------------------------------------------------- the gate and its estimates


def test_a_token_exactly_at_the_threshold_is_not_gated():
    # The paper's gate is H > threshold. 0.5 is exact in float32, so the comparison itself decides these tokens.
    case = make_case(seed=8, n=6)
    entropy = torch.tensor([0.5, 0.5, 0.5 + 1e-3, 0.5 - 1e-3, 2.0, 0.1], dtype=torch.float64)
    _, stats, _, _ = served(case, teacher_entropy=entropy, entropy_threshold=0.5)
    assert int(stats.num_high_entropy) == 2
    moved = entropy.clone()
    moved[:2] = 0.1  # the same tokens, clearly below: nothing may change
    loss, _, grad_hidden, _ = served(case, teacher_entropy=entropy, entropy_threshold=0.5)
    moved_loss, _, moved_grad_hidden, _ = served(case, teacher_entropy=moved, entropy_threshold=0.5)
    assert torch.equal(loss, moved_loss) and torch.equal(grad_hidden, moved_grad_hidden)
    gate, _ = teacher_gate(entropy.float(), entropy, entropy, 0.5)
    assert gate.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def tails_for(top, tail_tokens, mass):
    """Two tails below the top-K `top` (float64 probabilities) holding `mass`: spread evenly over `tail_tokens`, and as
    concentrated as the ranking allows (tokens of probability p_K, then the rest)."""
    p_k = top[-1]
    even = torch.full((tail_tokens,), mass / tail_tokens, dtype=torch.float64)
    full = int(mass // p_k)
    concentrated = torch.zeros(tail_tokens, dtype=torch.float64)
    concentrated[:full] = p_k
    concentrated[full] = mass - full * p_k
    assert even[0] < p_k and full + 1 < tail_tokens  # both are tails the ranking allows
    return even, concentrated


def entropy_of(*parts):
    p = torch.cat(parts)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


@pytest.mark.parametrize("vocab_size, k", [(89, 24), (5000, 32), (151_936, 32)])
def test_each_named_estimate_is_the_bound_it_names(vocab_size, k):
    # One top-K, three complete distributions behind it. The upper bound is the even tail over exactly V - K tokens,
    # the lower bound the most concentrated tail; the midpoint is their mean, `top_k` ignores the tail.
    mass = 0.2
    top = torch.exp(-0.05 * torch.arange(k, dtype=torch.float64))
    top = top / top.sum() * (1 - mass)
    even, concentrated = tails_for(top, vocab_size - k, mass)
    row = top.log().float().reshape(1, k)
    estimates = {name: float(estimate_teacher_entropy(row, vocab_size, name)[0]) for name in ENTROPY_ESTIMATES}
    lower, upper, _, tail_mass = (float(t[0]) for t in teacher_entropy_bounds(row, vocab_size))
    assert estimates["upper"] == upper and estimates["lower"] == lower
    tolerance = 1e-5 * max(1.0, entropy_of(top, even))  # float32 log-probs in, float64 arithmetic
    assert abs(upper - entropy_of(top, even)) < tolerance
    assert abs(lower - entropy_of(top, concentrated)) < tolerance
    assert abs(estimates["midpoint"] - (entropy_of(top, even) + entropy_of(top, concentrated)) / 2) < tolerance
    assert abs(estimates["top_k"] - entropy_of(top)) < tolerance
    assert abs(tail_mass - mass) < 1e-6
    assert lower <= estimates["decay"] <= upper
    assert upper - lower > 1e-3  # the bounds differ, so a swap between them is seen


def test_the_decay_estimate_is_exact_on_a_zipf_tail_and_between_the_bounds_elsewhere():
    # A Zipf teacher's top-K continues its own decay exactly, which is what the "decay" estimate models.
    vocab_size = 20_000
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    rows, exact = [], []
    for exponent, head in ((1.0, 9.0), (1.1, 6.0), (1.3, 3.0), (1.2, 0.0)):
        logits = -exponent * ranks.log()
        logits[0] += head
        log_probs = logits.log_softmax(-1)
        rows.append(log_probs[:32])
        exact.append(float(-(log_probs.exp() * log_probs).sum()))
    top = torch.stack(rows).float()
    decay = estimate_teacher_entropy(top, vocab_size)
    midpoint = estimate_teacher_entropy(top, vocab_size, "midpoint")
    exact = torch.tensor(exact, dtype=torch.float64)
    assert (decay - exact).abs().max() < 2e-3
    assert ((midpoint - exact).abs() > 5 * (decay - exact).abs()).all()  # the tail's shape is what is modelled
    # Rows the decay cannot model fall back to the midpoint: a zero probability in the top-K, or no tail mass.
    case = make_case(seed=9, n=3)
    top = case["top_log_probs"].clone()
    top[0, -2:] = -math.inf
    whole = make_case(seed=9, n=3, fetched=V)["top_log_probs"]
    for rows in (top, whole):
        estimate = estimate_teacher_entropy(rows, V)
        lower, upper, _, _ = teacher_entropy_bounds(rows, V)
        assert torch.isfinite(estimate).all() and (lower - 1e-9 <= estimate).all() and (estimate <= upper + 1e-9).all()
    torch.testing.assert_close(estimate_teacher_entropy(top[:1], V), estimate_teacher_entropy(top[:1], V, "midpoint"))
    for k in (1, 2, 3):
        estimate = estimate_teacher_entropy(case["top_log_probs"][:, :k], V)
        lower, upper, _, _ = teacher_entropy_bounds(case["top_log_probs"][:, :k], V)
        assert torch.isfinite(estimate).all() and (lower <= estimate).all() and (estimate <= upper).all()


def test_the_decay_estimate_follows_gaussian_logits_and_a_steep_head_over_a_flat_floor():
    # The two other tails the decay models, noise-free at a Qwen3-sized vocabulary: logits at the expected order
    # statistics of a Gaussian (the decay steepens past rank K), and a 64-token head falling 0.15 nats per rank over
    # a flat floor holding as much again (the top-32's decay accounts for too little mass: the rest is spread evenly).
    vocab_size = 151_936
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    gaussian = torch.special.ndtri(1 - (ranks - 0.5) / vocab_size)
    steep = torch.empty(vocab_size, dtype=torch.float64)
    steep[:64] = -0.15 * torch.arange(64, dtype=torch.float64)
    steep[64:] = torch.logsumexp(steep[1:64], 0) - math.log(vocab_size - 64)
    rows, exact = [], []
    for logits, head in ((2.0 * gaussian, 7.0), (2.0 * gaussian, 8.0), (2.5 * gaussian, 6.5), (steep, 5.0),
                         (steep, 6.0)):  # fmt: skip
        logits = logits.clone()
        logits[0] += head
        log_probs = logits.log_softmax(-1)
        rows.append(log_probs[:32])
        exact.append(float(-(log_probs.exp() * log_probs).sum()))
    top, exact = torch.stack(rows).float(), torch.tensor(exact, dtype=torch.float64)
    assert ((exact > 0.3) & (exact < 1.5)).all()
    decay = estimate_teacher_entropy(top, vocab_size)
    midpoint = estimate_teacher_entropy(top, vocab_size, "midpoint")
    assert (decay - exact).abs().max() < 0.01  # the target is 0.03 at the threshold
    assert ((midpoint - exact).abs() > 3 * (decay - exact).abs()).all()


def test_the_loss_gates_on_the_estimate_it_is_given_and_defaults_to_the_estimates_default():
    import inspect

    assert inspect.signature(estimate_teacher_entropy).parameters["estimate"].default == DEFAULT_ENTROPY_ESTIMATE
    case = make_case(seed=10)
    for name in ENTROPY_ESTIMATES:
        _, stats, _, _ = served(case, entropy_estimate=name)
        expected = estimate_teacher_entropy(case["top_log_probs"], V, name)
        torch.testing.assert_close(stats.teacher_entropy_estimate.double(), expected.sum(), rtol=1e-5, atol=1e-5)
        assert int(stats.num_high_entropy) == int((expected.float() > 0.8).sum())
    _, default_stats, _, _ = served(case)
    torch.testing.assert_close(
        default_stats.teacher_entropy_estimate.double(),
        estimate_teacher_entropy(case["top_log_probs"], V, DEFAULT_ENTROPY_ESTIMATE).sum(),
    )


# ------------------------------------------------------------------------------------------------ logged statistics


def float64_bounds(fetched, vocab_size):
    """`(lower, upper, tail_mass)` of the module docstring, written out: the concentrated tail, and the even one."""
    tail_mass = 1 - fetched.exp().sum(-1)
    top_k_entropy = -(fetched.exp() * fetched).sum(-1)
    upper = top_k_entropy - tail_mass * (tail_mass / (vocab_size - fetched.size(-1))).log()
    p_k = fetched[:, -1].exp()
    full = torch.floor(tail_mass / p_k)
    rest = tail_mass - full * p_k
    lower = top_k_entropy - full * p_k * p_k.log() - torch.where(rest > 0, rest * rest.log(), 0.0)
    return lower, upper, tail_mass


def independent_means(case, rows, threshold=0.8, top_k=16):
    """Per-token means of every logged statistic, in float64 from the teacher's logits and the student's logits."""
    student = student_logits(case).double()[rows].log_softmax(-1)
    teacher = case["teacher_logits"][rows].log_softmax(-1)
    targets = case["targets"][rows]
    exact_entropy = case["exact_entropy"][rows]
    gate = exact_entropy > threshold
    top, ids = teacher.topk(top_k, dim=-1)
    renormalised = top.log_softmax(-1)
    forward = (renormalised.exp() * (renormalised - student.gather(-1, ids))).sum(-1)
    sampled = student.gather(-1, targets[:, None])[:, 0] - teacher.gather(-1, targets[:, None])[:, 0]
    fetched = teacher.topk(case["top_log_probs"].size(-1), dim=-1).values
    lower, upper, tail_mass = float64_bounds(fetched, V)
    ambiguous = (lower <= threshold) & (upper > threshold)
    student_entropy = -(student.exp() * student).sum(-1)
    n = len(targets)
    return {
        # The statistics are taken with the exact entropy given, as a server with the plugin gives it: nothing of the
        # gate then rests on an estimate, so no token counts as ambiguous (`ambiguous_ratio` is what the bounds say).
        "eopd/teacher_entropy": float(exact_entropy.mean()),
        "eopd/teacher_entropy_exact": 1.0,
        "eopd/teacher_tail_mass": float(tail_mass.mean()),
        "eopd/gate_ambiguous_ratio": 0.0,
        "ambiguous_ratio": float(ambiguous.double().mean()),
        "eopd/student_entropy": float(student_entropy.mean()),
        "eopd/high_entropy_ratio": float(gate.double().mean()),
        "eopd/reverse_kl_sampled": float(sampled.mean()),
        "eopd/forward_kl_top_k": float(forward.mean()),
        "eopd/forward_kl_top_k_high_entropy": float(forward[gate].sum() / max(int(gate.sum()), 1)),
        "eopd/loss_base": float(sampled.mean()),
        "eopd/loss_forward_gated": float((forward * gate).sum() / n),
        "eopd/monitor/student_high_entropy_ratio": float((student_entropy > 0.8).double().mean()),
        "eopd/monitor/teacher_high_entropy_ratio": float((exact_entropy > 0.8).double().mean()),
    }


def test_logged_means_have_the_right_denominators_and_add_up_across_micro_batches():
    # One likely token over a flat tail, with a short top-K: some tokens' bounds straddle the threshold.
    case = make_case(seed=11, n=N, fetched=16, scale_low=0.3, scale_span=0.7, peaks=(5.0, 5.0))
    rows = torch.arange(N)
    first, second = rows[:13], rows[13:]  # two micro-batches of different sizes, as the trainer sums them
    stats = [served(case, rows=part, teacher_entropy=case["exact_entropy"][part])[1] for part in (first, second)]
    summed = ServedTeacherStats.from_tensor(stats[0].to_tensor() + stats[1].to_tensor()).means()
    expected = independent_means(case, rows)
    ambiguous = expected.pop("ambiguous_ratio")
    assert 0 < expected["eopd/high_entropy_ratio"] < 0.9  # so a wrong denominator for the gated mean shows
    assert 0 < ambiguous < 1
    assert set(summed) == set(expected)
    for name, value in expected.items():
        assert summed[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    # One micro-batch alone: its own token counts.
    alone = stats[1].means()
    alone_expected = independent_means(case, second)
    alone_ambiguous = alone_expected.pop("ambiguous_ratio")
    for name, value in alone_expected.items():
        assert alone[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    # Without the exact entropy (a stock server) the bounds decide which tokens are ambiguous, summed the same way.
    estimated = [served(case, rows=part)[1] for part in (first, second)]
    summed = ServedTeacherStats.from_tensor(estimated[0].to_tensor() + estimated[1].to_tensor()).means()
    assert summed["eopd/gate_ambiguous_ratio"] == pytest.approx(ambiguous, rel=1e-6)
    assert estimated[1].means()["eopd/gate_ambiguous_ratio"] == pytest.approx(alone_ambiguous, rel=1e-6)


@pytest.mark.parametrize("vocab_size", [V, 5000])
def test_the_gate_takes_the_vocabulary_it_is_given(vocab_size):
    # The trainer passes the served vocabulary, which need not be the student's rows: the tail spreads over V - K
    # tokens of that vocabulary, in the estimate and in the bounds that make a token ambiguous.
    case = make_case(seed=12, fetched=16, scale_low=0.3, scale_span=0.7, peaks=(5.0, 5.0))
    _, stats, _, _ = served(case, vocab_size=vocab_size, entropy_estimate="upper")
    lower, upper, _ = float64_bounds(case["top_log_probs"].double(), vocab_size)
    assert float(stats.teacher_entropy_estimate) == pytest.approx(float(upper.sum()), rel=1e-5)
    assert int(stats.num_high_entropy) == int((upper.float() > 0.8).sum())
    ambiguous = (lower <= 0.8) & (upper > 0.8)
    assert 0 < int(ambiguous.sum()) < N and int(stats.num_gate_ambiguous) == int(ambiguous.sum())
