"""`eopd_loss` against the independent float64 reference in tests/reference.py."""

import itertools
import math

import pytest
import torch
from reference import reference_eopd_loss, reference_per_token, reference_sampled_gradient

from trl_eopd import eopd_loss, eopd_loss_and_stats

VOCAB = 13


def make_batch(seed=0, batch=2, seq=6, vocab=VOCAB, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator) * 2.0
    # Sharpen every other teacher row so both sides of the 0.8-nat threshold are populated.
    sharpness = torch.where(torch.arange(batch * seq) % 2 == 0, 6.0, 0.7).reshape(batch, seq, 1)
    teacher = torch.randn(batch, seq, vocab, generator=generator) * sharpness
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :2] = -100  # a "prompt"
    labels[1, -1] = -100  # "padding"
    return student.to(dtype), teacher.to(dtype), labels


def teacher_entropies(teacher, labels, temperature=1.0):
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy[labels != -100]


def test_batch_has_both_low_and_high_entropy_tokens():
    _, teacher, labels = make_batch()
    entropy = teacher_entropies(teacher, labels)
    assert (entropy > 0.8).any() and (entropy < 0.8).any()


OPTION_GRID = [
    dict(gate=gate, beta=beta, temperature=temperature, forward_kl_top_k=top_k, forward_kl_coef=coef)
    for gate, beta, temperature, top_k, coef in itertools.product(
        ["augment", "switch"], [0.0, 0.3, 0.5, 1.0], [1.0, 1.7], [None, 4], [1.0, 0.3]
    )
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("num_items_in_batch", [None, 23])
def test_analytic_loss_and_gradient_match_reference(options, num_items_in_batch):
    student, teacher, labels = make_batch()
    student.requires_grad_(True)
    loss = eopd_loss(student, teacher, labels, num_items_in_batch=num_items_in_batch, **options)
    (grad,) = torch.autograd.grad(loss, student)

    student64 = student.detach().double().requires_grad_(True)
    expected = reference_eopd_loss(
        student64, teacher.double(), labels, num_items_in_batch=num_items_in_batch, **options
    )
    (expected_grad,) = torch.autograd.grad(expected, student64)

    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_estimator_value_matches_reference(gate, top_k, temperature):
    student, teacher, labels = make_batch(seed=1)
    options = dict(gate=gate, forward_kl_top_k=top_k, temperature=temperature, reverse_kl_estimator="sampled")
    loss = eopd_loss(student, teacher, labels, **options)
    expected = reference_eopd_loss(student.double(), teacher.double(), labels, **options)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_sampled_estimator_gradient_is_the_policy_gradient(temperature):
    student, teacher, labels = make_batch(seed=2)
    student.requires_grad_(True)
    loss = eopd_loss(
        student, teacher, labels, reverse_kl_estimator="sampled", entropy_threshold=math.inf, temperature=temperature
    )
    (grad,) = torch.autograd.grad(loss, student)
    expected = reference_sampled_gradient(student.detach(), teacher, labels, temperature=temperature)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sampled_estimator_expected_gradient_equals_analytic_reverse_kl_gradient(temperature):
    """E_{y ~ q}[grad of the sampled term] = grad KL(q || p), checked exactly by enumerating every label y."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(1, 1, VOCAB, generator=generator)
    teacher = torch.randn(1, 1, VOCAB, generator=generator)
    q = torch.softmax(student.double() / temperature, -1).reshape(-1)

    expected_grad = torch.zeros(VOCAB, dtype=torch.float64)
    for y in range(VOCAB):
        s = student.clone().requires_grad_(True)
        loss = eopd_loss(
            s,
            teacher,
            torch.tensor([[y]]),
            reverse_kl_estimator="sampled",
            entropy_threshold=math.inf,
            temperature=temperature,
        )
        (grad,) = torch.autograd.grad(loss, s)
        expected_grad += q[y] * grad.reshape(-1).double()

    s = student.clone().requires_grad_(True)
    analytic = eopd_loss(s, teacher, torch.tensor([[0]]), entropy_threshold=math.inf, temperature=temperature)
    (analytic_grad,) = torch.autograd.grad(analytic, s)
    torch.testing.assert_close(expected_grad, analytic_grad.reshape(-1).double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_infinite_threshold_equals_gkd_generalized_jsd(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = make_batch(seed=4)
    ours = eopd_loss(student, teacher, labels, entropy_threshold=math.inf, beta=beta, temperature=temperature)
    gkd = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, gkd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coef", [1.0, 0.25])
def test_threshold_below_every_entropy_is_reverse_plus_coef_forward(coef):
    student, teacher, labels = make_batch(seed=5)
    combined = eopd_loss(student, teacher, labels, entropy_threshold=0.0, forward_kl_coef=coef)
    reverse = eopd_loss(student, teacher, labels, entropy_threshold=math.inf, beta=1.0)
    forward = eopd_loss(student, teacher, labels, entropy_threshold=math.inf, beta=0.0)
    torch.testing.assert_close(combined, reverse + coef * forward, rtol=1e-5, atol=1e-6)


def test_gate_only_acts_above_threshold():
    student, teacher, labels = make_batch(seed=6)
    entropy = teacher_entropies(teacher, labels)
    threshold = float(entropy.median())
    loss = eopd_loss(student, teacher, labels, entropy_threshold=threshold, gate="switch")
    flat = [
        reference_per_token(
            s,
            t,
            int(y),
            entropy_threshold=threshold,
            forward_kl_coef=1.0,
            gate="switch",
            beta=1.0,
            temperature=1.0,
            forward_kl_top_k=None,
            reverse_kl_estimator="analytic",
        )
        for s, t, y in zip(student.reshape(-1, VOCAB), teacher.reshape(-1, VOCAB), labels.reshape(-1))
        if int(y) != -100
    ]
    gates = [g for _, _, g in flat]
    assert 0 < sum(gates) < len(gates)
    torch.testing.assert_close(loss.double(), sum(v for v, _, _ in flat) / len(flat), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_batch_without_loss_tokens_is_zero_with_gradient(num_items_in_batch):
    student, teacher, labels = make_batch()
    student.requires_grad_(True)
    labels = torch.full_like(labels, -100)
    loss, stats = eopd_loss_and_stats(student, teacher, labels, num_items_in_batch=num_items_in_batch)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) == 0
    assert all(math.isfinite(v) for v in stats.means().values())


@pytest.mark.parametrize("num_items", [0, 0.0, torch.tensor(0), torch.tensor(0.0)])
@pytest.mark.parametrize("top_k", [None, 3])
def test_window_without_loss_tokens_is_zero_not_nan(num_items, top_k):
    """`num_items_in_batch=0` means the whole accumulation window has no loss token: 0, never 0 / 0."""
    student, teacher, labels = make_batch()
    student.requires_grad_(True)
    loss = eopd_loss(
        student, teacher, torch.full_like(labels, -100), num_items_in_batch=num_items, forward_kl_top_k=top_k
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(student.grad) == 0


def test_fractional_divisor_is_used_as_given():
    """A process's share of a global count can be below 1 (1 token over 2 processes): only 0 is special."""
    student, teacher, labels = make_batch()
    torch.testing.assert_close(
        eopd_loss(student, teacher, labels, num_items_in_batch=0.5),
        2.0 * eopd_loss(student, teacher, labels, num_items_in_batch=1),
    )
    with pytest.raises(ValueError, match="num_items_in_batch"):
        eopd_loss(student, teacher, labels, num_items_in_batch=-1)


@pytest.mark.parametrize("estimator", ["analytic", "sampled"])
def test_bf16_inputs_are_finite_and_close_to_float32(estimator):
    student, teacher, labels = make_batch(seed=7)
    student_bf16, teacher_bf16 = student.bfloat16(), teacher.bfloat16()
    loss_bf16 = eopd_loss(student_bf16, teacher_bf16, labels, reverse_kl_estimator=estimator)
    # Compare with float32 on the same (bf16-rounded) inputs: the computation itself must not lose precision.
    loss_fp32 = eopd_loss(student_bf16.float(), teacher_bf16.float(), labels, reverse_kl_estimator=estimator)
    assert loss_bf16.dtype == torch.float32 and torch.isfinite(loss_bf16)
    torch.testing.assert_close(loss_bf16, loss_fp32, rtol=1e-5, atol=1e-6)
    # Both against the float64 reference on the same bf16-rounded values, at float32's tolerance: what bf16 rounds is
    # the input, never the computation.
    expected = reference_eopd_loss(
        student_bf16.double(), teacher_bf16.double(), labels, reverse_kl_estimator=estimator
    )
    torch.testing.assert_close(loss_bf16.double(), expected, rtol=1e-5, atol=1e-6)


def test_stats_match_reference_definitions():
    student, teacher, labels = make_batch(seed=8)
    _, stats = eopd_loss_and_stats(
        student, teacher, labels, entropy_threshold=1.0, forward_kl_top_k=3, monitor_entropy_threshold=1.5
    )
    mask = labels != -100
    log_q = torch.log_softmax(student.double(), -1)[mask]
    log_p = torch.log_softmax(teacher.double(), -1)[mask]
    q, p = log_q.exp(), log_p.exp()
    teacher_entropy = -(p * log_p).sum(-1)
    high = teacher_entropy > 1.0
    forward = (p * (log_p - log_q)).sum(-1)
    means = stats.means()
    assert int(stats.num_tokens) == int(mask.sum())
    assert means["eopd/teacher_entropy"] == pytest.approx(float(teacher_entropy.mean()), rel=1e-5)
    assert means["eopd/student_entropy"] == pytest.approx(float(-(q * log_q).sum(-1).mean()), rel=1e-5)
    assert means["eopd/high_entropy_ratio"] == pytest.approx(float(high.double().mean()), rel=1e-6)
    assert means["eopd/reverse_kl"] == pytest.approx(float((q * (log_q - log_p)).sum(-1).mean()), rel=1e-5)
    assert means["eopd/forward_kl"] == pytest.approx(float(forward.mean()), rel=1e-5)
    assert means["eopd/forward_kl_high_entropy"] == pytest.approx(float(forward[high].mean()), rel=1e-5)
    # The monitoring threshold (1.5) is not the gate's (1.0): each set of metrics must use its own.
    student_entropy = -(q * log_q).sum(-1)
    teacher_high, student_high = teacher_entropy > 1.5, student_entropy > 1.5
    assert 0 < int(teacher_high.sum()) < int(high.sum())
    assert means["eopd/monitor/teacher_high_entropy_ratio"] == pytest.approx(float(teacher_high.double().mean()))
    assert means["eopd/monitor/student_high_entropy_ratio"] == pytest.approx(float(student_high.double().mean()))
    assert means["eopd/monitor/forward_kl_teacher_high_entropy"] == pytest.approx(
        float(forward[teacher_high].mean()), rel=1e-5
    )


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("estimator", ["analytic", "sampled"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_loss_terms_as_used_add_up_to_the_loss(gate, estimator, top_k):
    """loss_base and loss_forward are the two terms as the loss uses them, checked against the float64 reference: the
    base term alone is the reference with forward_kl_coef=0, the forward term is what a coefficient of 1 adds."""
    student, teacher, labels = make_batch(seed=9)
    options = dict(gate=gate, reverse_kl_estimator=estimator, forward_kl_top_k=top_k, entropy_threshold=1.0)
    coef = 0.7
    loss, stats = eopd_loss_and_stats(student, teacher, labels, forward_kl_coef=coef, **options)
    means = stats.means()
    base = float(reference_eopd_loss(student, teacher, labels, forward_kl_coef=0.0, **options))
    forward = float(reference_eopd_loss(student, teacher, labels, forward_kl_coef=1.0, **options)) - base
    assert forward > 0
    assert means["eopd/loss_base"] == pytest.approx(base, rel=1e-5, abs=1e-6)
    assert means["eopd/loss_forward_gated"] == pytest.approx(forward, rel=1e-5, abs=1e-6)
    assert float(loss) == pytest.approx(means["eopd/loss_base"] + coef * means["eopd/loss_forward_gated"], rel=1e-5)


def test_mismatched_shapes_raise_clear_errors():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match="teacher_logits"):
        eopd_loss(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        eopd_loss(student, teacher, labels[:, :-1])


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(entropy_threshold=float("nan")), "entropy_threshold"),
        (dict(entropy_threshold=-0.1), "entropy_threshold"),
        (dict(gate="replace"), "gate"),
        (dict(forward_kl_top_k=0), "forward_kl_top_k"),
        (dict(forward_kl_coef=-1.0), "forward_kl_coef"),
        (dict(reverse_kl_estimator="mc"), "reverse_kl_estimator"),
        (dict(reverse_kl_estimator="sampled", beta=0.5), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(monitor_entropy_threshold=float("inf")), "monitor_entropy_threshold"),
        (dict(monitor_entropy_threshold=-1.0), "monitor_entropy_threshold"),
    ],
)
def test_invalid_options_raise(options, field):
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match=field):
        eopd_loss_and_stats(student, teacher, labels, **options)


@pytest.mark.parametrize("top_k", [None, 3, 16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gate_off_loss_is_gkd_trainers_loss_only_at_temperature_one(beta, top_k):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = make_batch(seed=7)

    def gkd_trainer_loss(student_logits, teacher_logits):
        # `GKDTrainer.compute_loss` leaves `temperature` at its default 1: GKD applies it to sampling only.
        return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta)

    def ours(temperature):
        return eopd_loss(
            student,
            teacher,
            labels,
            entropy_threshold=math.inf,
            beta=beta,
            temperature=temperature,
            forward_kl_top_k=top_k,
        )

    torch.testing.assert_close(ours(1.0), gkd_trainer_loss(student, teacher), rtol=1e-5, atol=1e-6)
    # At GKD's default 0.9, EOPD scales both models' logits before the divergence, so the two differ...
    assert not torch.allclose(ours(0.9), gkd_trainer_loss(student, teacher), rtol=1e-3, atol=0)
    # ...and EOPD's is GKD's formula on the tempered logits, which is what the float64 reference says.
    torch.testing.assert_close(ours(0.9), gkd_trainer_loss(student / 0.9, teacher / 0.9), rtol=1e-5, atol=1e-6)
    expected = reference_eopd_loss(
        student, teacher, labels, entropy_threshold=math.inf, beta=beta, temperature=0.9, forward_kl_top_k=top_k
    )
    torch.testing.assert_close(ours(0.9).double(), expected, rtol=1e-5, atol=1e-6)


def one_hot_and_spread_teacher(vocab=VOCAB, seq=6):
    """Teacher logits whose even rows are exactly one-hot (entropy exactly 0.0) and odd rows spread (entropy > 0)."""
    teacher = torch.randn(1, seq, vocab, generator=torch.Generator().manual_seed(10)) * 0.5
    one_hot_rows = torch.arange(seq) % 2 == 0
    # exp(-1e4) is 0 in float32 and float64, so p is exactly one-hot and -sum p log p is exactly 0.
    teacher[0, one_hot_rows] = 0.0
    teacher[0, one_hot_rows, torch.arange(seq)[one_hot_rows] % vocab] = 1e4
    return teacher, one_hot_rows


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_gate_is_strict_at_a_teacher_entropy_equal_to_the_threshold(gate, top_k):
    # The paper's gate is 1[H > threshold]: a teacher entropy of exactly the threshold gets no forward KL.
    teacher, one_hot_rows = one_hot_and_spread_teacher()
    student = torch.randn(1, teacher.shape[1], VOCAB, generator=torch.Generator().manual_seed(8))
    labels = torch.randint(0, VOCAB, (1, teacher.shape[1]), generator=torch.Generator().manual_seed(9))
    # beta=0.5: a bounded base term (the reverse KL to a one-hot teacher is ~1e4 and would drown the forward KL).
    options = dict(gate=gate, forward_kl_top_k=top_k, beta=0.5, forward_kl_coef=1.0)
    _, one_hot_stats = eopd_loss_and_stats(
        student[:, one_hot_rows], teacher[:, one_hot_rows], labels[:, one_hot_rows], entropy_threshold=0.0, **options
    )
    assert float(one_hot_stats.teacher_entropy) == 0.0  # the premise: the entropy is exactly the threshold
    loss, stats = eopd_loss_and_stats(student, teacher, labels, entropy_threshold=0.0, **options)
    assert int(stats.num_high_entropy) == int((~one_hot_rows).sum())
    expected = reference_eopd_loss(student, teacher, labels, entropy_threshold=0.0, **options)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # And the difference matters: gating the one-hot rows too would change the loss.
    all_gated = reference_eopd_loss(student, teacher, labels, entropy_threshold=-1.0, **options)
    assert abs(float(expected - all_gated)) > 0.1
