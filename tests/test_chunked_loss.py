"""The chunked, hidden-state EOPD loss must agree with the full-logits reference in value, statistics and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trl_eopd.loss import chunked_eopd_loss_and_stats, eopd_loss_and_stats

N, V, H_S, H_T = 37, 97, 16, 24


def make_inputs(n=N, dtype=torch.float32, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    # Scales chosen so that teacher entropies straddle the default 0.8-nat threshold and both gate branches are hit.
    inputs = {
        "student_hidden": randn(n, H_S),
        "student_weight": randn(V, H_S, scale=0.5),
        "teacher_hidden": randn(n, H_T),
        "teacher_weight": randn(V, H_T, scale=torch.rand(V, generator=generator).mul(2.0).unsqueeze(-1)),
        "targets": torch.randint(0, V, (n,), generator=generator),
    }
    if bias:
        inputs["student_bias"] = randn(V, scale=0.3)
        inputs["teacher_bias"] = randn(V, scale=0.3)
    return inputs


def full_logits(hidden, weight, bias, scale, softcap):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference(inputs, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
              **options):  # fmt: skip
    student_logits = full_logits(
        inputs["student_hidden"], inputs["student_weight"], inputs.get("student_bias"), student_logit_scale,
        student_softcap,
    )  # fmt: skip
    teacher_logits = full_logits(
        inputs["teacher_hidden"], inputs["teacher_weight"], inputs.get("teacher_bias"), teacher_logit_scale,
        teacher_softcap,
    )  # fmt: skip
    return eopd_loss_and_stats(
        student_logits.unsqueeze(0), teacher_logits.unsqueeze(0), inputs["targets"].unsqueeze(0), **options
    )


def student_leaves(inputs):
    return {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k.startswith("student_")}


def assert_matches(inputs, chunk_size=8, **options):
    ref_leaves, new_leaves = student_leaves(inputs), student_leaves(inputs)
    ref_loss, ref_stats = reference({**inputs, **ref_leaves}, **options)
    loss, stats = chunked_eopd_loss_and_stats(**{**inputs, **new_leaves}, chunk_size=chunk_size, **options)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for field in dataclasses.fields(stats):
        got, want = getattr(stats, field.name), getattr(ref_stats, field.name)
        assert got.dtype == want.dtype, field.name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=field.name)

    ref_grads = torch.autograd.grad(ref_loss, list(ref_leaves.values()))
    grads = torch.autograd.grad(loss, list(new_leaves.values()))
    for name, got, want in zip(ref_leaves, grads, ref_grads):
        # Relative to the gradient's own scale: chunked matmuls sum in a different order than the full one.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
    return loss, stats


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [None, 5])
def test_analytic_options(gate, beta, top_k):
    _, stats = assert_matches(make_inputs(), gate=gate, beta=beta, forward_kl_top_k=top_k, temperature=1.3)
    assert 0 < int(stats.num_high_entropy) < N  # both sides of the gate are exercised


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_sampled_estimator(gate, top_k):
    assert_matches(make_inputs(), gate=gate, forward_kl_top_k=top_k, reverse_kl_estimator="sampled")


@pytest.mark.parametrize("threshold", [0.0, float("inf")])
def test_gate_all_or_nothing(threshold):
    assert_matches(make_inputs(), entropy_threshold=threshold, forward_kl_coef=0.7)


@pytest.mark.parametrize("num_items", [100, torch.tensor(55)])
def test_num_items_in_batch(num_items):
    assert_matches(make_inputs(), num_items_in_batch=num_items)


def test_top_k_larger_than_vocab():
    assert_matches(make_inputs(), forward_kl_top_k=1000)


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 256])
def test_chunk_sizes(chunk_size):
    assert_matches(make_inputs(), chunk_size=chunk_size)


def test_bias_scale_and_softcap():
    assert_matches(
        make_inputs(bias=True),
        student_logit_scale=0.7,
        teacher_logit_scale=1.9,
        student_softcap=2.5,
        teacher_softcap=4.0,
        temperature=0.8,
        beta=0.5,
        forward_kl_top_k=4,
        gate="switch",
    )


def test_tied_weights_accumulate_both_paths():
    inputs = make_inputs()
    embedding = torch.nn.Embedding(V, H_S)
    with torch.no_grad():
        embedding.weight.copy_(inputs["student_weight"])
    token_ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))

    def loss_with(loss_fn):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(token_ids) + inputs["student_hidden"])
        loss = loss_fn(hidden, embedding.weight)
        loss.backward()
        return embedding.weight.grad.clone()

    want = loss_with(
        lambda h, w: eopd_loss_and_stats(
            (h @ w.t()).unsqueeze(0),
            (inputs["teacher_hidden"] @ inputs["teacher_weight"].t()).unsqueeze(0),
            inputs["targets"].unsqueeze(0),
        )[0]
    )
    got = loss_with(
        lambda h, w: chunked_eopd_loss_and_stats(
            h, w, inputs["teacher_hidden"], inputs["teacher_weight"], inputs["targets"], chunk_size=10
        )[0]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_frozen_weight_and_no_grad():
    inputs = make_inputs()
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss, _ = chunked_eopd_loss_and_stats(**{**inputs, "student_hidden": hidden})
    (grad,) = torch.autograd.grad(loss, [hidden])
    reference_hidden = inputs["student_hidden"].clone().requires_grad_(True)
    reference_loss, _ = reference({**inputs, "student_hidden": reference_hidden})
    (expected,) = torch.autograd.grad(reference_loss, [reference_hidden])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    with torch.no_grad():
        no_grad_loss, no_grad_stats = chunked_eopd_loss_and_stats(**{**inputs, **student_leaves(inputs)})
    assert no_grad_loss.grad_fn is None
    ref_loss, ref_stats = reference(inputs)
    torch.testing.assert_close(no_grad_loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(no_grad_stats.to_tensor(), ref_stats.to_tensor(), rtol=1e-5, atol=1e-5)


def test_teacher_requiring_grad_gets_none():
    inputs = make_inputs()
    teacher_hidden = inputs["teacher_hidden"].clone().requires_grad_(True)
    leaves = student_leaves(inputs)
    loss, _ = chunked_eopd_loss_and_stats(**{**inputs, **leaves, "teacher_hidden": teacher_hidden})
    loss.backward()
    assert teacher_hidden.grad is None
    assert leaves["student_weight"].grad is not None


@pytest.mark.parametrize("num_items", [0, torch.tensor(0), torch.tensor(0.0)])
def test_window_without_loss_tokens_gives_zero_not_an_error(num_items):
    inputs = make_inputs(n=0)
    leaves = student_leaves(inputs)
    loss, _ = chunked_eopd_loss_and_stats(**{**inputs, **leaves}, num_items_in_batch=num_items)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(leaves["student_weight"].grad == 0)


def test_empty_batch():
    inputs = make_inputs(n=0)
    leaves = student_leaves(inputs)
    loss, stats = chunked_eopd_loss_and_stats(**{**inputs, **leaves})
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.all(leaves["student_weight"].grad == 0)
    assert int(stats.num_tokens) == 0 and float(stats.teacher_entropy) == 0.0
    _, ref_stats = reference(inputs)
    torch.testing.assert_close(stats.to_tensor(), ref_stats.to_tensor())


def test_bf16_matches_the_full_logits_loss_of_the_same_bf16_model():
    fp32_inputs = make_inputs()
    bf16_inputs = make_inputs(dtype=torch.bfloat16)
    leaves32, leaves16 = student_leaves(fp32_inputs), student_leaves(bf16_inputs)
    reference16 = student_leaves(bf16_inputs)
    loss32, _ = chunked_eopd_loss_and_stats(**{**fp32_inputs, **leaves32}, chunk_size=8)
    loss16, _ = chunked_eopd_loss_and_stats(**{**bf16_inputs, **leaves16}, chunk_size=8)
    # The full-logits path on the same bf16 weights projects in bf16 too, then works in float32: same logits, so the
    # loss agrees to float32 precision.
    expected16, _ = reference({**bf16_inputs, **reference16})
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, expected16, rtol=1e-5, atol=1e-6)
    # Against float32 weights, only bf16's rounding of the inputs separates them (measured: 6e-5 relative).
    torch.testing.assert_close(loss16, loss32, rtol=1e-3, atol=0.0)
    for loss in (loss32, loss16, expected16):
        loss.backward()
    for name in leaves16:
        got, want, want32 = leaves16[name].grad, reference16[name].grad.float(), leaves32[name].grad
        assert got.dtype == torch.bfloat16, name
        # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); measured: 0.4% of the norm, 0.7% element-wise.
        assert (got.float() - want).norm() <= 1e-2 * want.norm(), name
        torch.testing.assert_close(got.float(), want, rtol=0.0, atol=1.5e-2 * want.abs().max().item(), msg=name)
        # And close to the float32 model's gradient (measured: 0.7% of the norm).
        assert (got.float() - want32).norm() <= 2e-2 * want32.norm(), name


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_invalid_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_eopd_loss_and_stats(**make_inputs(), chunk_size=chunk_size)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        chunked_eopd_loss_and_stats(**make_inputs(), reverse_kl_estimator="sampled", beta=0.5)
    with pytest.raises(ValueError, match="gate"):
        chunked_eopd_loss_and_stats(**make_inputs(), gate="sometimes")


def test_upstream_gradient_scales_the_gradients():
    inputs = make_inputs(bias=True)
    leaves, scaled_leaves = student_leaves(inputs), student_leaves(inputs)
    chunked_eopd_loss_and_stats(**{**inputs, **leaves})[0].backward()
    (2.5 * chunked_eopd_loss_and_stats(**{**inputs, **scaled_leaves})[0]).backward()
    for name in leaves:
        torch.testing.assert_close(scaled_leaves[name].grad, 2.5 * leaves[name].grad, rtol=1e-6, atol=1e-7)


def test_backward_twice_accumulates():
    inputs = make_inputs()
    leaves, twice_leaves = student_leaves(inputs), student_leaves(inputs)
    chunked_eopd_loss_and_stats(**{**inputs, **leaves})[0].backward()
    loss, _ = chunked_eopd_loss_and_stats(**{**inputs, **twice_leaves})
    loss.backward(retain_graph=True)
    loss.backward()
    for name in leaves:
        torch.testing.assert_close(twice_leaves[name].grad, 2 * leaves[name].grad)


@pytest.mark.parametrize("gate", ["augment", "switch"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_gate_is_strict_at_a_teacher_entropy_equal_to_the_threshold(gate, top_k):
    # Compared with the float64 reference, not the full-logits loss: a boundary bug shared by both would pass that.
    from reference import reference_eopd_loss

    inputs = make_inputs(seed=3)
    # Even rows: the hidden state is a unit vector on one of the first `k` dimensions, whose weight column holds 1e4 at
    # one token and exactly 0 elsewhere, so the float32 probabilities are exactly one-hot and the entropy exactly 0.0,
    # the threshold. Odd rows use only the other dimensions: spread distributions.
    n, k = inputs["teacher_hidden"].shape[0], H_T // 2
    one_hot_rows = torch.arange(n) % 2 == 0
    weight, hidden = inputs["teacher_weight"].clone(), inputs["teacher_hidden"].clone()
    weight[:, :k] = 0.0
    weight[torch.arange(k) * 7 % V, torch.arange(k)] = 1e4
    hidden[:, :k] = 0.0
    hidden[one_hot_rows] = torch.nn.functional.one_hot(torch.arange(n)[one_hot_rows] // 2 % k, H_T).float()
    inputs.update(teacher_weight=weight, teacher_hidden=hidden)
    teacher_logits = hidden @ weight.t()
    assert (teacher_logits[one_hot_rows].count_nonzero(-1) == 1).all()

    options = dict(gate=gate, forward_kl_top_k=top_k, beta=0.5, forward_kl_coef=1.0, entropy_threshold=0.0)
    per_row = ("student_hidden", "teacher_hidden", "targets")
    one_hot_inputs = {key: value[one_hot_rows] if key in per_row else value for key, value in inputs.items()}
    _, one_hot_stats = chunked_eopd_loss_and_stats(**one_hot_inputs, chunk_size=8, **options)
    assert float(one_hot_stats.teacher_entropy) == 0.0  # the premise: the entropy is exactly the threshold
    loss, stats = chunked_eopd_loss_and_stats(**inputs, chunk_size=8, **options)
    assert int(stats.num_high_entropy) == int((~one_hot_rows).sum())
    student_logits = inputs["student_hidden"] @ inputs["student_weight"].t()
    targets = inputs["targets"].unsqueeze(0)
    expected = reference_eopd_loss(student_logits.unsqueeze(0), teacher_logits.unsqueeze(0), targets, **options)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    all_gated = reference_eopd_loss(
        student_logits.unsqueeze(0), teacher_logits.unsqueeze(0), targets, **{**options, "entropy_threshold": -1.0}
    )
    assert abs(float(expected - all_gated)) > 0.1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_target_log_probs_out_holds_the_students_log_prob_of_each_target(temperature):
    inputs = make_inputs()
    logits = inputs["student_hidden"].double() @ inputs["student_weight"].double().t() / temperature
    want = (logits - logits.logsumexp(-1, keepdim=True)).gather(-1, inputs["targets"].unsqueeze(-1)).squeeze(-1)

    chunked = torch.full((N,), float("nan"))
    chunked_eopd_loss_and_stats(**{**inputs, **student_leaves(inputs)}, chunk_size=8, temperature=temperature,
                                target_log_probs_out=chunked)  # fmt: skip
    torch.testing.assert_close(chunked.double(), want, rtol=1e-5, atol=1e-5)

    full = torch.full((N,), float("nan"))
    eopd_loss_and_stats(
        (inputs["student_hidden"] @ inputs["student_weight"].t()).unsqueeze(0),
        (inputs["teacher_hidden"] @ inputs["teacher_weight"].t()).unsqueeze(0),
        inputs["targets"].unsqueeze(0), temperature=temperature, target_log_probs_out=full,
    )  # fmt: skip
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-5)
