"""Float32 losses over a Qwen3-sized vocabulary (V = 151,936) on peaked rows, against the float64 reference.

On CPU, `torch.log_softmax` in float32 over ~150k logits was off by up to ~1e-4 (absolute) on rows where one token
holds most of the mass, and so was one batched matmul summing p log p over the whole vocabulary; `python
tests/test_large_vocab_precision.py` prints both on the rows below, next to `logits - logsumexp(logits)` and the sums
in blocks that the losses use. The log_softmax error is a shift of the whole row's log-normaliser, so it passes
straight into log q(y), the KL terms and the entropies. Every loss path must stay within its stated float32 tolerance
(1e-5 relative, docs/benchmarks.md) here.
"""

from __future__ import annotations

import pytest
import torch
from reference import reference_eopd_loss

from trl_eopd.loss import chunked_eopd_loss_and_stats, eopd_loss_and_stats
from trl_eopd.loss.served import served_teacher_eopd_loss_and_stats

V, H, N = 151_936, 8, 6


def peaked_case(seed=0):
    """Hidden states and projections whose logits have s.d. about 2 plus one token 13-22 nats above the rest per row.

    Both models peak on the same token of a row (by different margins), so the KL terms are small and a shift of the
    log-normaliser shows in the relative error.
    """
    generator = torch.Generator().manual_seed(seed)
    peaks = torch.randperm(V, generator=generator)[:N]
    case = {}
    for side, lift in (("student", torch.linspace(13.0, 22.0, N)), ("teacher", torch.linspace(21.0, 14.0, N))):
        hidden = torch.randn(N, H, generator=generator)
        hidden = hidden / hidden.norm(dim=-1, keepdim=True)
        weight = torch.randn(V, H, generator=generator) * 2.0
        weight[peaks] += hidden * lift[:, None]  # the peak token's logit rises by `lift` in its row
        case[side] = (hidden, weight)
    case["targets"] = peaks.clone()  # sampled on-policy, the likely token; one row samples another
    case["targets"][-1] = (peaks[-1] + 1) % V
    return case


def logits(case, side, dtype=torch.float32):
    hidden, weight = case[side]
    return hidden.to(dtype) @ weight.to(dtype).t()


@pytest.fixture(scope="module")
def case():
    return peaked_case()


def expected_per_row(case, **options):
    student, teacher = logits(case, "student", torch.float64), logits(case, "teacher", torch.float64)
    return [reference_eopd_loss(student[i : i + 1][None], teacher[i : i + 1][None], case["targets"][i : i + 1][None],
                                **options) for i in range(N)]  # fmt: skip


OPTIONS = [
    dict(reverse_kl_estimator="analytic", forward_kl_top_k=None),
    dict(reverse_kl_estimator="analytic", forward_kl_top_k=16),
    dict(reverse_kl_estimator="sampled", forward_kl_top_k=16),
]


# One row per call: a per-token error would hide in a sum dominated by the rows with large values.
@pytest.mark.parametrize("options", OPTIONS)
def test_full_logits_loss_matches_float64_on_peaked_rows(case, options):
    student, teacher = logits(case, "student"), logits(case, "teacher")
    for i, expected in enumerate(expected_per_row(case, entropy_threshold=0.3, **options)):
        loss, _ = eopd_loss_and_stats(student[i : i + 1][None], teacher[i : i + 1][None],
                                      case["targets"][i : i + 1][None], entropy_threshold=0.3, **options)  # fmt: skip
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6, msg=f"row {i}")


@pytest.mark.parametrize("options", OPTIONS)
def test_chunked_loss_matches_float64_on_peaked_rows(case, options):
    (student_hidden, student_weight), (teacher_hidden, teacher_weight) = case["student"], case["teacher"]
    for i, expected in enumerate(expected_per_row(case, entropy_threshold=0.3, **options)):
        loss, _ = chunked_eopd_loss_and_stats(student_hidden[i : i + 1], student_weight, teacher_hidden[i : i + 1],
                                              teacher_weight, case["targets"][i : i + 1], entropy_threshold=0.3,
                                              **options)  # fmt: skip
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6, msg=f"row {i}")


def test_served_loss_matches_float64_on_peaked_rows(case):
    teacher = logits(case, "teacher", torch.float64).log_softmax(-1)
    top, ids = teacher.topk(32, dim=-1)
    exact_entropy = -(teacher.exp() * teacher).sum(-1)
    targets = case["targets"]
    target_log_probs = teacher.gather(-1, targets[:, None])[:, 0].float()
    student_hidden, student_weight = case["student"]
    expected = expected_per_row(case, reverse_kl_estimator="sampled", forward_kl_top_k=16, entropy_threshold=0.3)
    for i in range(N):
        rows = slice(i, i + 1)
        loss, _ = served_teacher_eopd_loss_and_stats(
            student_hidden[rows], student_weight, targets[rows], top[rows].float(), ids[rows], target_log_probs[rows],
            teacher_entropy=exact_entropy[rows], entropy_threshold=0.3,
        )  # fmt: skip
        torch.testing.assert_close(loss.double(), expected[i], rtol=1e-5, atol=1e-6, msg=f"row {i}")


def measured_errors(case):
    """Worst absolute errors, on these rows, of the float32 normalisations and vocabulary sums (against float64)."""
    from trl_eopd.loss.chunked import _vocab_bmm

    stacked = torch.stack([logits(case, "student"), logits(case, "teacher")], 1)  # (N, 2, V), as the chunked loss
    reference = stacked.double().log_softmax(-1)
    by_logsumexp = stacked - stacked.logsumexp(-1, keepdim=True)
    dots = torch.bmm(reference.exp(), reference.transpose(1, 2))
    probs, log_probs = by_logsumexp.exp(), by_logsumexp
    return {
        "torch.log_softmax": float((stacked.log_softmax(-1).double() - reference).abs().max()),
        "logits - logsumexp": float((by_logsumexp.double() - reference).abs().max()),
        "one bmm over V (sums of p log p)": float((torch.bmm(probs, log_probs.mT).double() - dots).abs().max()),
        "bmm in blocks of 4096": float((_vocab_bmm(probs, log_probs).double() - dots).abs().max()),
    }


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_large_vocab_precision.py
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; V = {V}, {N} peaked rows; worst absolute error against float64:")
    for name, error in measured_errors(peaked_case()).items():
        print(f"  {name:<34} {error:.1e}")
