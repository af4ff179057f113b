"""What `EOPDTrainer.evaluate()` logs, against float64 values recomputed from each row alone (tests/reference.py).

Evaluation scores the dataset's completions. Checked here, with a local teacher and with a served one (its
`TeacherServer` answered by the same teacher run locally, so no server is needed; the real server is exercised in
tests/vllm_engine/test_teacher_server.py):

- `eval_loss` is the per-token mean over the whole evaluation, equal to its `eopd/*` parts, at eval batch sizes 1, 2
  and 4 (the Trainer's own loop averages per-batch means, which weights a short row's tokens more than a long one's);
- with `reverse_kl_estimator="sampled"` no logged KL, or loss made of one, is negative: the sampled estimate
  log q(y) - log p(y) is only valid on the student's own samples, and on a student close to its teacher it is
  strongly negative on the dataset's completions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from reference import reference_per_token
from transformers import AutoModelForCausalLM

from trl_eopd import EOPDConfig, EOPDTrainer
from trl_eopd.tiny import build_servable_tiny_teacher, build_tiny_tokenizer, toy_arithmetic_conversations

BATCH_SIZES = (1, 2, 4)
TOP_K = 4
FORWARD_KL_COEF = 0.5
# Where the student sits near its teacher: the analytic reverse KL on the rows below is small and positive while the
# sampled estimate on the same tokens is far below 0 (asserted in `expected`, so the tests keep reproducing it).
STUDENT_NOISE = 0.02


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-metrics")
    tokenizer = build_tiny_tokenizer()
    # A sharpened teacher, so that its entropies fall on both sides of a gate; the student is the same model plus
    # small noise (the case where a negative sampled "KL" misleads most).
    teacher = build_servable_tiny_teacher(tokenizer)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(STUDENT_NOISE * torch.randn(parameter.shape, generator=generator))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = toy_arithmetic_conversations(8, seed=3)
    # Completions of very different lengths: a mean of per-row means is far from the per-token mean.
    for row, repeats in zip(rows, [1, 5, 1, 3, 2, 6, 1, 4]):
        row["messages"][1]["content"] = " ".join([row["messages"][1]["content"]] * repeats)
    return {"teacher": str(root / "teacher"), "student": str(root / "student"), "tokenizer": tokenizer,
            "dataset": Dataset.from_list(rows), "root": root}  # fmt: skip


def _trainer(setup, name, **overrides):
    args = {
        "output_dir": str(setup["root"] / name), "bf16": False, "report_to": [], "lmbda": 1.0, "max_new_tokens": 8,
        "forward_kl_top_k": TOP_K, "forward_kl_coef": FORWARD_KL_COEF, **overrides,
    }  # fmt: skip
    served = args.get("teacher_model_server_url") is not None
    return EOPDTrainer(
        model=setup["student"],
        teacher_model=None if served else setup["teacher"],
        args=EOPDConfig(**args),
        train_dataset=setup["dataset"],
        processing_class=setup["tokenizer"],
    )


def _evaluate_at_each_batch_size(trainer, dataset):
    logs = {}
    for batch_size in BATCH_SIZES:
        trainer.args.per_device_eval_batch_size = batch_size
        logs[batch_size] = trainer.evaluate(dataset)
    return logs


def _per_token_float64(setup, collator):
    """Per completion token, from each row alone in float64: the teacher's entropy, the analytic and the sampled base
    terms, and the top-k forward KL (each isolated by the options of `reference_per_token`)."""
    student = AutoModelForCausalLM.from_pretrained(setup["student"]).double().eval()
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"]).double().eval()
    columns = {name: [] for name in ("entropy", "analytic", "sampled", "forward_top_k")}
    rows = []
    for index, row in enumerate(setup["dataset"]):
        batch = collator([row])
        mask = batch["labels"][0, 1:] != -100
        with torch.no_grad():
            student_logits = student(input_ids=batch["input_ids"]).logits[0, :-1][mask]
            teacher_logits = teacher(input_ids=batch["input_ids"]).logits[0, :-1][mask]
        rows += [index] * int(mask.sum())
        for token in zip(student_logits, teacher_logits, batch["labels"][0, 1:][mask].tolist()):
            base, entropy, _ = _reference_term(*token, "analytic")
            columns["entropy"].append(entropy)
            columns["analytic"].append(float(base))
            columns["sampled"].append(float(_reference_term(*token, "sampled")[0]))
            # A gate open everywhere that switches the base term off leaves the forward term alone.
            forward, _, _ = _reference_term(*token, "analytic", gate="switch", entropy_threshold=-1.0,
                                            forward_kl_coef=1.0)  # fmt: skip
            columns["forward_top_k"].append(float(forward))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in columns.items()}, torch.tensor(rows)


def _reference_term(student_row, teacher_row, label, estimator, gate="augment", entropy_threshold=0.0,
                    forward_kl_coef=0.0):  # fmt: skip
    options = {"gate": gate, "entropy_threshold": entropy_threshold, "forward_kl_coef": forward_kl_coef, "beta": 1.0,
               "temperature": 1.0, "forward_kl_top_k": TOP_K}  # fmt: skip
    return reference_per_token(student_row, teacher_row, label, reverse_kl_estimator=estimator, **options)


def _threshold_in_a_gap(entropies):
    """A gate threshold in the widest gap between the middle tokens' entropies, so float32 rounding flips no token."""
    ordered = entropies.sort().values
    middle = ordered[len(ordered) // 5 : 4 * len(ordered) // 5]
    gaps = middle[1:] - middle[:-1]
    i = int(gaps.argmax())
    assert gaps[i] > 1e-4
    return float((middle[i] + middle[i + 1]) / 2)


@pytest.fixture(scope="module")
def expected(setup):
    columns, rows = _per_token_float64(setup, _trainer(setup, "probe").data_collator)
    threshold = _threshold_in_a_gap(columns["entropy"])
    gate = (columns["entropy"] > threshold).double()
    gated_forward = gate * columns["forward_top_k"]
    loss = columns["analytic"] + FORWARD_KL_COEF * gated_forward
    values = {
        "threshold": threshold,
        "loss": float(loss.mean()),
        "reverse_kl": float(columns["analytic"].mean()),
        "loss_forward_gated": float(gated_forward.mean()),
        "forward_kl_top_k": float(columns["forward_top_k"].mean()),
        # Per token of the first two rows, for the loss of one evaluation batch.
        "first_rows": {"loss": loss[rows < 2], "forward_kl_top_k": columns["forward_top_k"][rows < 2]},
    }
    # The two defects' conditions hold on these rows, so the tests below reproduce them: the gate has tokens on both
    # sides, the sampled estimate is negative where the KL is not, and a mean of per-row means (the Trainer's loop at
    # eval batch size 1) is far from the per-token mean.
    assert 0.1 < float(gate.mean()) < 0.9
    assert float(columns["sampled"].mean()) < -0.5 and values["reverse_kl"] > 0.05
    row_means = [float(loss[rows == row].mean()) for row in rows.unique()]
    assert abs(sum(row_means) / len(row_means) - values["loss"]) > 0.02 * values["loss"]
    return values


def _assert_no_negative_divergence(log):
    for name, value in log.items():
        if "kl" in name or name.endswith("loss") or "/loss_" in name:
            assert value >= 0.0, (name, value)


@pytest.mark.parametrize("estimator", ["analytic", "sampled"])
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_local_teacher_evaluation_is_per_token_and_scores_the_analytic_kl(
    setup, expected, estimator, memory_efficient
):
    trainer = _trainer(setup, f"local-{estimator}", reverse_kl_estimator=estimator,
                       memory_efficient_loss=memory_efficient, entropy_threshold=expected["threshold"])  # fmt: skip
    logs = _evaluate_at_each_batch_size(trainer, setup["dataset"])
    for batch_size, log in logs.items():
        # Both estimators are scored with the analytic reverse KL: the dataset's completions are not the student's.
        assert log["eval_loss"] == pytest.approx(expected["loss"], rel=1e-5), batch_size
        assert log["eval_eopd/loss_base"] == pytest.approx(expected["reverse_kl"], rel=1e-5), batch_size
        assert log["eval_eopd/reverse_kl"] == pytest.approx(expected["reverse_kl"], rel=1e-5), batch_size
        assert log["eval_eopd/loss_forward_gated"] == pytest.approx(expected["loss_forward_gated"], rel=1e-5)
        parts = log["eval_eopd/loss_base"] + FORWARD_KL_COEF * log["eval_eopd/loss_forward_gated"]
        assert log["eval_loss"] == pytest.approx(parts, rel=1e-6), batch_size
        assert log["eval_loss"] == pytest.approx(logs[BATCH_SIZES[0]]["eval_loss"], rel=1e-6), batch_size
        _assert_no_negative_divergence(log)
    # What evaluation averages: the loss of one batch in eval mode, a per-token mean, or a sum over a given count.
    _assert_eval_mode_batch_loss(trainer, setup, expected["first_rows"]["loss"])


def _assert_eval_mode_batch_loss(trainer, setup, per_token):
    batch = trainer._prepare_inputs(trainer.data_collator([setup["dataset"][0], setup["dataset"][1]]))
    trainer.model.eval()
    with torch.no_grad():
        mean = trainer.compute_loss(trainer.model, dict(batch))
        summed = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=3 * len(per_token))
    assert float(mean) == pytest.approx(float(per_token.mean()), rel=1e-5)
    assert float(summed) == pytest.approx(float(per_token.sum()) / (3 * len(per_token)), rel=1e-5)


class _LocalTeacherServer:
    """`TeacherServer`'s interface answered by a local teacher: the top-K log-probs of each loss token and the
    log-prob of the token itself, as a vLLM server returns them (float32, sorted by rank)."""

    def __init__(self, teacher_dir, url, *, top_logprobs, timeout, retries, student_vocab_size, teacher_name=None):
        self.vocab_size = student_vocab_size
        self.top_logprobs = min(top_logprobs, student_vocab_size)
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()

    def fetch(self, batches, global_step):
        from trl_eopd.teacher_server import ServedTeacherLogProbs

        fetched = []
        for batch in batches:
            mask = batch["labels"][:, 1:] != -100
            with torch.no_grad():
                logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            log_probs = logits[:, :-1][mask].float().log_softmax(-1)
            top, ids = log_probs.topk(self.top_logprobs, dim=-1)
            target = log_probs.gather(-1, batch["labels"][:, 1:][mask].unsqueeze(-1)).squeeze(-1)
            fetched.append(ServedTeacherLogProbs(top, ids, target))
        return fetched

    def close(self):
        pass


def test_served_teacher_evaluation_reports_the_top_k_forward_kl(setup, expected, monkeypatch):
    from trl_eopd import teacher_server

    monkeypatch.setattr(
        teacher_server, "TeacherServer", lambda *args, **kwargs: _LocalTeacherServer(setup["teacher"], *args, **kwargs)
    )
    trainer = _trainer(setup, "served", teacher_model_server_url="http://stand-in:8000",
                       reverse_kl_estimator="sampled", entropy_threshold=expected["threshold"], max_steps=1,
                       logging_steps=1)  # fmt: skip
    logs = _evaluate_at_each_batch_size(trainer, setup["dataset"])
    for batch_size, log in logs.items():
        # The sampled estimate and the loss terms made of it are not logged; the loss is the top-k forward KL.
        for name in ("eval_eopd/reverse_kl_sampled", "eval_eopd/loss_base", "eval_eopd/loss_forward_gated"):
            assert name not in log, (batch_size, name)
        assert log["eval_loss"] == pytest.approx(expected["forward_kl_top_k"], rel=1e-5), batch_size
        assert log["eval_loss"] == pytest.approx(log["eval_eopd/forward_kl_top_k"], rel=1e-6), batch_size
        assert log["eval_loss"] == pytest.approx(logs[BATCH_SIZES[0]]["eval_loss"], rel=1e-6), batch_size
        _assert_no_negative_divergence(log)
    _assert_eval_mode_batch_loss(trainer, setup, expected["first_rows"]["forward_kl_top_k"])
    # On the student's own samples, in training, the sampled estimate and the loss's terms are logged as before.
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    assert "eopd/reverse_kl_sampled" in log
    assert log["loss"] == pytest.approx(log["eopd/loss_base"] + FORWARD_KL_COEF * log["eopd/loss_forward_gated"],
                                        rel=1e-5)  # fmt: skip
