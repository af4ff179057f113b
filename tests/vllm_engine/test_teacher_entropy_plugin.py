"""trl-eopd's vLLM plugin (trl_eopd/vllm_plugin/): a real server returns the teacher's exact entropy; the gate is exact.

One server for the module, started with `python -m trl_eopd.vllm_plugin.serve` (the repository is only on PYTHONPATH
here, as in CI), hosting `trl_eopd.tiny.build_servable_tiny_teacher`, whose entropies straddle the 0.8-nat gate. The
stock server of `test_teacher_server.py` checks the other side: no plugin, the estimate, said once.
"""

from __future__ import annotations

import logging

import pytest
import torch
from served_teacher import TeacherServerProcess, save_servable_teacher, teacher_sampled_batch

from trl_eopd.loss import eopd_loss_and_stats
from trl_eopd.loss.served import served_teacher_eopd_loss_and_stats, teacher_entropy_bounds
from trl_eopd.teacher_server import TeacherServer
from trl_eopd.tiny import build_tiny_tokenizer, toy_arithmetic_conversations
from trl_eopd.vllm_plugin import PLUGIN_NAME, patches

THRESHOLD = 0.8
# Closest a token's float64 entropy may lie to the threshold for the gates to be comparable at all: the server's
# float32 entropy is within ~1e-6 of it (the check below allows 1e-5).
MARGIN = 1e-4
# Prompt tokens the server computes per step: the test's sequences are longer, so their prompt log-probs (and the
# plugin's extra column) are filled over several prefill chunks, as for long prompts on a real server.
PREFILL_CHUNK = 32


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_servable_teacher(tmp_path_factory.mktemp("plugin-teacher"))


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    process = TeacherServerProcess(
        str(teacher_dir), max_model_len=256, log_dir=tmp_path_factory.mktemp("logs"), entropy_plugin=True,
        extra_args=("--max-num-batched-tokens", str(PREFILL_CHUNK), "--max-num-seqs", "8"),
    )  # fmt: skip
    process.start()
    yield process
    process.stop()


def _client(server) -> TeacherServer:
    return TeacherServer(server.url, top_logprobs=32, timeout=60.0, retries=1,
                         student_vocab_size=len(build_tiny_tokenizer()))  # fmt: skip


def test_the_served_entropy_gate_and_loss_are_the_local_teachers(server, teacher_dir, caplog):
    assert f"{PLUGIN_NAME} active (vLLM 0.32" in server.log_tail(200_000), "the server log does not say it is active"
    # Seed 1: the midpoint estimate misses 4 of these 576 gates (measured); seed 0 it gets all right.
    batch, teacher = teacher_sampled_batch(teacher_dir, seed=1)
    assert int(batch["attention_mask"].sum(1).max()) > 2 * PREFILL_CHUNK
    with caplog.at_level(logging.INFO, logger="trl_eopd.teacher_server"):
        client = _client(server)
    assert client.exact_entropy and "the gate is exact" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    (served,) = client.fetch([batch], global_step=0)

    loss_mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    teacher_logits = teacher_logits[loss_mask]
    teacher_log_probs = teacher_logits.double().log_softmax(-1)
    exact = -(teacher_log_probs.exp() * teacher_log_probs).sum(-1)
    targets = batch["labels"][:, 1:][loss_mask]

    # The entropy, per completion token, is the local teacher's (float32 forward passes on both sides).
    assert served.entropy is not None and served.entropy.shape == exact.shape
    torch.testing.assert_close(served.entropy.double(), exact, rtol=0, atol=1e-5)
    # The tokens fall on both sides of the threshold, none so close that float32 could flip its side.
    above = int((exact > THRESHOLD).sum())
    assert 20 <= above <= exact.numel() - 20, f"{above} of {exact.numel()} tokens above the threshold"
    assert float((exact - THRESHOLD).abs().min()) > MARGIN, "a token's entropy lies on the threshold: pick other data"
    # So the served gate agrees with the exact one on every token, including tokens whose side the top-K cannot tell
    # (the entropy bounds from the top-K straddle the threshold), where any estimate may err.
    assert torch.equal(served.entropy > THRESHOLD, exact > THRESHOLD)
    lower, upper, _, _ = teacher_entropy_bounds(served.top_log_probs, client.vocab_size)
    assert int(((lower < THRESHOLD) & (upper > THRESHOLD)).sum()) >= 5

    # The loss and the student's gradients from the served log-probs and entropy, on every token, against the loss
    # with the local teacher's full logits.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(targets.numel(), 16, generator=generator)
    weight = torch.randn(client.vocab_size, 16, generator=generator) * 0.3
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = served_teacher_eopd_loss_and_stats(
        h, w, targets, served.top_log_probs, served.top_ids, served.target_log_probs, teacher_entropy=served.entropy,
        forward_kl_top_k=16, chunk_size=64,
    )  # fmt: skip
    loss.backward()
    h_local, w_local = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    local_loss, local_stats = eopd_loss_and_stats(
        (h_local @ w_local.t()).unsqueeze(0), teacher_logits.unsqueeze(0), targets.unsqueeze(0),
        reverse_kl_estimator="sampled", forward_kl_top_k=16,
    )  # fmt: skip
    local_loss.backward()
    torch.testing.assert_close(loss, local_loss.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad, h_local.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.grad, w_local.grad, rtol=0, atol=1e-5)
    assert int(stats.num_high_entropy) == int(local_stats.num_high_entropy) == above
    means = stats.means()
    assert means["eopd/teacher_entropy_exact"] == 1.0
    assert means["eopd/teacher_entropy"] == pytest.approx(float(exact.mean()), abs=1e-5)


def test_the_trainer_gates_on_the_served_entropy(server, teacher_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer

    args = EOPDConfig(output_dir=str(tmp_path), bf16=False, report_to=[], use_cpu=True, reverse_kl_estimator="sampled",
                      teacher_model_server_url=server.url, teacher_model_server_timeout=60, max_steps=1,
                      logging_steps=1, per_device_train_batch_size=2, max_new_tokens=8, lmbda=1.0, save_strategy="no",
                      teacher_eos_token="<|im_end|>")  # fmt: skip
    trainer = EOPDTrainer(model=str(teacher_dir), teacher_model=None, args=args,
                          train_dataset=Dataset.from_list(toy_arithmetic_conversations(4)),
                          processing_class=AutoTokenizer.from_pretrained(teacher_dir))  # fmt: skip
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["eopd/teacher_entropy_exact"] == 1.0, logged
    assert "eopd/teacher_entropy" in logged and "eopd/teacher_entropy_estimate" not in logged


# In-process, without a server: what the plugin computes, and that it patches nothing on a vLLM it was not tested with.


@pytest.mark.parametrize("mode", ["processed_logprobs", "raw_logits"])
def test_the_row_entropy_equals_the_float64_one_with_masked_tokens(mode):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(150, 1000, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 8, 150)[:, None]
    logits[::7, :500] = -torch.inf  # masked tokens: probability 0, log-probability -inf
    log_probs = logits.log_softmax(-1)
    expected = -torch.where(log_probs.isinf(), 0.0, log_probs.exp() * log_probs).sum(-1)
    scores = (logits if mode == "raw_logits" else log_probs).float()
    entropy = patches.entropy_of_rows(scores, mode)  # 150 rows: three chunks of rows, the last one short
    assert entropy.dtype == torch.float64 and torch.isfinite(entropy).all()
    torch.testing.assert_close(entropy, expected, rtol=0, atol=2e-6)


def test_an_untested_vllm_version_is_not_patched_and_says_why(monkeypatch, caplog):
    import vllm
    from vllm.v1.sample.sampler import Sampler

    before = Sampler.gather_logprobs
    logger = logging.getLogger("trl_eopd_plugin_test")
    monkeypatch.setattr(vllm, "__version__", "0.99.1")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert patches.apply(logger) is False
    assert "vLLM 0.99.1 is not a version this plugin was tested with (0.32.x)" in caplog.text
    assert "falls back to the estimate" in caplog.text
    assert Sampler.gather_logprobs is before


def test_a_changed_vllm_function_is_not_patched_and_says_which(monkeypatch, caplog):
    from vllm.v1.sample.sampler import Sampler

    from trl_eopd import _compat

    before = Sampler.gather_logprobs
    targets = [(module, owner, name, [*parameters, "extra"] if name == "empty_cpu" else parameters)
               for module, owner, name, parameters in _compat.VLLM_ENTROPY_PLUGIN_TARGETS]  # fmt: skip
    monkeypatch.setattr(_compat, "VLLM_ENTROPY_PLUGIN_TARGETS", tuple(targets))
    logger = logging.getLogger("trl_eopd_plugin_test")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert patches.apply(logger) is False
    assert "vllm.v1.outputs.LogprobsTensors.empty_cpu takes" in caplog.text and "patches nothing" in caplog.text
    assert Sampler.gather_logprobs is before
