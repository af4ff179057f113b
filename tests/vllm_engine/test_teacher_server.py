"""EOPD with the teacher served by a real, unpatched vLLM server on CPU (one server for the whole module).

The served teacher is `trl_eopd.tiny.build_servable_tiny_teacher`: a tiny Qwen3 with 32-wide attention heads (the
smallest vLLM's CPU engine runs), its logits sharpened so that its entropies straddle the 0.8-nat gate. Checked here:

- the served log-probabilities, and the loss and gradients computed from them, against the same teacher run locally;
- the gate's agreement with the exact one, measured on the teacher's own samples;
- evaluation: `eval_loss` is the top-k forward KL at any eval batch size, and no sampled estimate is logged;
- `trl-eopd train` end to end with 1 and 2 processes;
- every start-up error (unreachable server, vocabulary, context, fetch count) and the fault path: the server killed
  mid-run, bounded retries, the error naming the URL and the step, the last checkpoint intact, and a resumed run
  once the server is back on the same port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from served_teacher import (
    TeacherServerProcess,
    free_port,
    save_servable_teacher,
    teacher_sampled_batch,
    train_until_checkpoint_then_stop,
)

from trl_eopd.loss import eopd_loss_and_stats
from trl_eopd.loss.served import estimate_teacher_entropy, served_teacher_eopd_loss_and_stats
from trl_eopd.teacher_server import TeacherServer, TeacherServerError
from trl_eopd.tiny import build_tiny_tokenizer, toy_arithmetic_conversations

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Fewest tokens where the default ("decay") gate must agree with the exact one, at the default fetch count (measured on
# this teacher, 99.8% at T=1 with k=32, the midpoint's 99.4%: see scripts/teacher_gate_agreement.py; a failure means
# the estimate or the server changed).
GATE_AGREEMENT_FLOOR = 0.98


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_servable_teacher(tmp_path_factory.mktemp("served-teacher"))


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    process = TeacherServerProcess(str(teacher_dir), max_model_len=256, log_dir=tmp_path_factory.mktemp("logs"))
    process.start()
    yield process
    process.stop()


def _env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _client(server, **overrides) -> TeacherServer:
    options = dict(top_logprobs=32, timeout=60.0, retries=1, student_vocab_size=len(build_tiny_tokenizer()))
    options.update(overrides)
    return TeacherServer(server.url, **options)


def test_served_loss_equals_the_local_teacher_loss_where_the_gates_agree(server, teacher_dir, caplog):
    batch, teacher = teacher_sampled_batch(teacher_dir)
    with caplog.at_level("WARNING", logger="trl_eopd.teacher_server"):
        client = _client(server)
    # A stock server (no trl-eopd plugin): the client falls back to the estimate and says so in one line.
    said = [record for record in caplog.records if "does not return the teacher's entropy" in record.getMessage()]
    assert not client.exact_entropy and len(said) == 1
    (served,) = client.fetch([batch], global_step=0)
    assert served.entropy is None
    loss_mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    teacher_log_probs = teacher_logits[loss_mask].double().log_softmax(-1)
    targets = batch["labels"][:, 1:][loss_mask]

    # What the server returned is the local teacher's (float32 on both sides).
    local_top, local_ids = teacher_log_probs.topk(32, dim=-1)
    torch.testing.assert_close(served.top_log_probs.double(), local_top, rtol=0, atol=1e-4)
    assert (served.top_ids[:, :16] == local_ids[:, :16]).float().mean() > 0.99  # ties aside, the same ranking
    torch.testing.assert_close(served.target_log_probs.double(), teacher_log_probs.gather(-1, targets[:, None])[:, 0],
                               rtol=0, atol=1e-4)  # fmt: skip

    # The gate: measured agreement of the default estimate with the exact entropy.
    exact_entropy = -(teacher_log_probs.exp() * teacher_log_probs).sum(-1)
    estimate = estimate_teacher_entropy(served.top_log_probs, client.vocab_size)
    exact_gate, estimated_gate = exact_entropy > 0.8, estimate > 0.8
    agreement = (exact_gate == estimated_gate).double().mean().item()
    assert 0.1 < exact_gate.double().mean().item() < 0.9, "the teacher's entropies no longer straddle the gate"
    assert agreement >= GATE_AGREEMENT_FLOOR, f"gate agreement {agreement:.4f} < {GATE_AGREEMENT_FLOOR}"

    # The loss and the student's gradients on the tokens where the gates agree, against the local-teacher loss.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(targets.numel(), 16, generator=generator)
    weight = torch.randn(client.vocab_size, 16, generator=generator) * 0.3
    rows = (exact_gate == estimated_gate).nonzero().squeeze(-1)

    def served_loss(**options):
        h, w = hidden[rows].clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, _ = served_teacher_eopd_loss_and_stats(
            h, w, targets[rows], served.top_log_probs[rows], served.top_ids[rows], served.target_log_probs[rows],
            forward_kl_top_k=16, chunk_size=64, **options,
        )  # fmt: skip
        loss.backward()
        return loss.detach(), h.grad, w.grad

    h, w = hidden[rows].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    local_loss, _ = eopd_loss_and_stats(
        (h @ w.t()).unsqueeze(0), teacher_logits[loss_mask][rows].unsqueeze(0), targets[rows].unsqueeze(0),
        reverse_kl_estimator="sampled", forward_kl_top_k=16,
    )  # fmt: skip
    local_loss.backward()
    for options in ({}, {"teacher_entropy": exact_entropy[rows]}):
        loss, grad_hidden, grad_weight = served_loss(**options)
        torch.testing.assert_close(loss, local_loss.detach(), rtol=0, atol=1e-4)
        torch.testing.assert_close(grad_hidden, h.grad, rtol=0, atol=1e-4)
        torch.testing.assert_close(grad_weight, w.grad, rtol=0, atol=1e-4)


def test_unreachable_server_names_the_url_and_the_timeout():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TeacherServerError, match=rf"{url} did not answer GET /health within "
                                                 r"`teacher_model_server_timeout=1.5`"):  # fmt: skip
        TeacherServer(url, top_logprobs=16, timeout=1.5, retries=0, student_vocab_size=320)
    assert time.monotonic() - start < 15  # an error, not a hang


@pytest.mark.parametrize("student_vocab_size", [300, 330])
def test_a_vocabulary_mismatch_names_both_sizes(server, student_vocab_size):
    with pytest.raises(TeacherServerError, match=rf"vocabulary of 320 token ids but the student has "
                                                 rf"{student_vocab_size}"):  # fmt: skip
        _client(server, student_vocab_size=student_vocab_size)


def test_context_is_checked_before_the_request_with_room_for_the_generated_token(server):
    client = _client(server, top_logprobs=4)
    assert client.max_model_len == 256
    fits = torch.full((1, 255), 7)
    labels = fits.clone()
    labels[:, :5] = -100
    (result,) = client.fetch([{"input_ids": fits, "attention_mask": torch.ones_like(fits), "labels": labels}], 0)
    assert result.top_log_probs.shape == (250, 4)
    too_long = torch.full((1, 256), 7)
    labels = too_long.clone()
    labels[:, :5] = -100
    with pytest.raises(TeacherServerError, match=r"A sequence of 256 tokens .* `max_model_len` is 256"):
        client.fetch([{"input_ids": too_long, "attention_mask": torch.ones_like(too_long), "labels": labels}], 0)


def test_a_fetch_count_beyond_the_vocabulary_is_clamped(server):
    client = _client(server, top_logprobs=1000)
    batch = {"input_ids": torch.tensor([[3, 9, 11]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 9, 11]])}  # fmt: skip
    (result,) = client.fetch([batch], 0)
    assert result.top_log_probs.shape == (2, 320)
    # The whole vocabulary came back, so the probabilities sum to 1 (zeros arrive as -9999 and become -inf).
    torch.testing.assert_close(result.top_log_probs.double().exp().sum(-1), torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_a_teacher_module_with_a_server_url_is_refused(server, teacher_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer

    args = EOPDConfig(output_dir=str(tmp_path), bf16=False, report_to=[], use_cpu=True, reverse_kl_estimator="sampled",
                      teacher_model_server_url=server.url)  # fmt: skip
    with pytest.raises(ValueError, match=r"`teacher_model` must be None or a name when"):
        EOPDTrainer(model=str(teacher_dir), teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir), args=args,
                    train_dataset=Dataset.from_list(toy_arithmetic_conversations(4)),
                    processing_class=AutoTokenizer.from_pretrained(teacher_dir))  # fmt: skip


def test_evaluation_with_a_served_teacher_reports_the_top_k_forward_kl(server, teacher_dir, tmp_path):
    """`eval_loss` is the top-k forward KL per token at any eval batch size; no sampled estimate is logged."""
    import copy

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)  # near its teacher, where the sampled estimate on dataset tokens is negative
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    rows = Dataset.from_list(toy_arithmetic_conversations(4, seed=5))
    logs = []
    for batch_size in (1, 4):
        args = EOPDConfig(output_dir=str(tmp_path), bf16=False, report_to=[], use_cpu=True, forward_kl_top_k=16,
                          reverse_kl_estimator="sampled", teacher_model_server_url=server.url,
                          per_device_eval_batch_size=batch_size)  # fmt: skip
        trainer = EOPDTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer)
        logs.append(trainer.evaluate(rows))
    # The same top-16 forward KL from the local teacher in float64, row by row.
    per_token = []
    for row in rows:
        batch = trainer.data_collator([row])
        mask = batch["labels"][0, 1:] != -100
        with torch.no_grad():
            log_q = student(input_ids=batch["input_ids"]).logits[0, :-1][mask].double().log_softmax(-1)
            log_p = teacher(input_ids=batch["input_ids"]).logits[0, :-1][mask].double().log_softmax(-1)
        top_log_p, top_ids = log_p.topk(16, dim=-1)
        renormalised = top_log_p - top_log_p.logsumexp(-1, keepdim=True)
        per_token.append((renormalised.exp() * (renormalised - log_q.gather(-1, top_ids))).sum(-1))
    expected = float(torch.cat(per_token).mean())
    for log in logs:
        assert "eval_eopd/reverse_kl_sampled" not in log and "eval_eopd/loss_base" not in log
        assert log["eval_loss"] == pytest.approx(log["eval_eopd/forward_kl_top_k"], rel=1e-6)
        assert log["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert logs[0]["eval_loss"] == pytest.approx(logs[1]["eval_loss"], rel=1e-6)


def _train_command(server, output_dir, *extra):
    return [
        "-m", "trl_eopd.cli", "train", "--config", "tiny-cpu", "--teacher_model_server_url", server.url,
        "--teacher_model_server_timeout", "30", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def _run(command, env, timeout):
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out


def test_train_cli_with_a_served_teacher(server, tiny_assets, tmp_path):
    root, _ = tiny_assets
    code, log = _run([sys.executable, *_train_command(server, tmp_path / "out", "--max_steps", "2")],
                     _env(TRL_EOPD_TINY_DIR=str(root)), timeout=300)  # fmt: skip
    assert code == 0, log[-6000:]
    assert "eopd/teacher_entropy_estimate" in log and "eopd/forward_kl_top_k" in log
    assert "'eopd/teacher_entropy'" not in log and "'eopd/reverse_kl'" not in log  # nothing needs the full teacher
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_train_cli_with_a_served_teacher_vllm_rollouts_and_a_lora_student(server, tiny_assets, tmp_path):
    root, _ = tiny_assets
    extra = ["--max_steps", "2", "--use_vllm", "true", "--vllm_gpu_memory_utilization", "0.05",
             "--vllm_max_model_length", "256", "--use_peft", "true", "--lora_r", "4",
             "--lora_target_modules", "q_proj", "v_proj"]  # fmt: skip
    code, log = _run([sys.executable, *_train_command(server, tmp_path / "out", *extra)],
                     _env(TRL_EOPD_TINY_DIR=str(root), VLLM_ENABLE_V1_MULTIPROCESSING="0",
                          VLLM_CPU_KVCACHE_SPACE="1"), timeout=400)  # fmt: skip
    assert code == 0, log[-6000:]
    assert "eopd/teacher_entropy_estimate" in log and "eopd/vllm_logprob_abs_diff" in log
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_train_cli_with_a_served_teacher_on_two_processes(server, tiny_assets, tmp_path):
    root, _ = tiny_assets
    # torchrun plus `use_cpu` is accelerate's 2-process CPU (gloo) setup; each process asks the server for its rows.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        *_train_command(server, tmp_path / "out", "--max_steps", "2", "--use_cpu", "true"),
    ]
    code, log = _run(command, _env(TRL_EOPD_TINY_DIR=str(root)), timeout=400)
    assert code == 0, log[-6000:]
    assert "2 process(es)" in log and "eopd/teacher_entropy_estimate" in log
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_server_killed_mid_run_stops_training_and_a_resumed_run_continues(server, tiny_assets, tmp_path):
    """Last in the module: it stops the shared server and starts it again on the same port."""
    root, _ = tiny_assets
    output_dir = tmp_path / "out"
    train = [sys.executable, *_train_command(server, output_dir, "--max_steps", "8", "--save_strategy", "steps",
                                             "--save_steps", "2", "--teacher_model_server_retries", "2")]  # fmt: skip
    returncode, log = train_until_checkpoint_then_stop(
        server, train, _env(TRL_EOPD_TINY_DIR=str(root)), output_dir, timeout=240
    )
    assert returncode != 0
    assert f"The teacher server at {server.url} failed at global step" in log, log[-4000:]
    assert "after 3 attempt(s)" in log, log[-4000:]

    from transformers import AutoModelForCausalLM

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    last = checkpoints[-1]
    step = int(last.name.split("-")[1])
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == step
    AutoModelForCausalLM.from_pretrained(last)  # intact: it loads

    server.start()
    code, resumed = _run([*train, "--resume_from_checkpoint", "true"], _env(TRL_EOPD_TINY_DIR=str(root)), timeout=300)
    assert code == 0, resumed[-6000:]
    final = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))[-1]
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 8
