"""Rollouts on the student's own vLLM server (`vllm_mode="server"`), with one real server for the whole module.

The server hosts the tiny recipe's student (`tiny://student`) in float32, with the endpoints weight pushes need
(`VLLM_SERVER_DEV_MODE=1`, runtime LoRA). Tests that train push their weights into it, so none relies on what it held
before; every trainer here pushes its own weights at its first step (a LoRA one its base weights too).

Proof of sync: after training, the server's greedy completions equal the trainer's saved student's, and differ from
the untrained student's (the learning rate is large on purpose).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import requests
import torch
from datasets import Dataset
from served_teacher import TeacherServerProcess, train_until_checkpoint_then_stop
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_eopd import EOPDConfig, EOPDTrainer
from trl_eopd.rollouts import SAMPLER_LOGPROBS
from trl_eopd.rollouts.server import STALENESS_METRIC
from trl_eopd.rollouts.student_server import LORA_ADAPTER_NAME, StudentServerError
from trl_eopd.tiny import IM_END, toy_arithmetic_conversations

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STUDENT_SERVER_FLAGS = ["--logprobs-mode", "processed_logprobs", "--enable-lora", "--max-lora-rank", "8"]
STUDENT_SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


@pytest.fixture(scope="module")
def student(tiny_assets):
    return tiny_assets[1]["student"]


@pytest.fixture(scope="module")
def server(student, tmp_path_factory):
    process = TeacherServerProcess(student, max_model_len=256, log_dir=tmp_path_factory.mktemp("student-server"),
                                   flags=STUDENT_SERVER_FLAGS, env=STUDENT_SERVER_ENV)  # fmt: skip
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def teacher_server(tiny_assets, tmp_path_factory):
    process = TeacherServerProcess(tiny_assets[1]["teacher"], max_model_len=256,
                                   log_dir=tmp_path_factory.mktemp("teacher-server"))  # fmt: skip
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


def _prompts(student, count=4) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(student)
    rows = toy_arithmetic_conversations(count, seed=7)
    return [tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                          return_dict=False) for row in rows]  # fmt: skip


def _server_greedy(server, prompts, model=None) -> list[list[int]]:
    if model is None:
        model = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    answer = requests.post(f"{server.url}/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 8,
                           "temperature": 0.0, "return_token_ids": True}, timeout=60).json()  # fmt: skip
    return [choice["token_ids"] for choice in sorted(answer["choices"], key=lambda c: c["index"])]


def _hf_greedy(model, prompts) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)  # fmt: skip
            out.append(generated[0, len(prompt) :].tolist())
    return out


def _strip_after_stop(completions, stop_ids):
    # vLLM stops at the model's end token; `generate` was told not to: compare up to and including it.
    cut = []
    for completion in completions:
        ends = [i for i, token in enumerate(completion) if token in stop_ids]
        cut.append(completion[: ends[0] + 1] if ends else completion)
    return cut


@pytest.mark.parametrize("max_staleness, processes", [(0, 1), (1, 2)])
def test_train_cli_tiny_cpu_with_server_rollouts_ends_with_the_trained_weights(
    server, tiny_assets, student, tmp_path, max_staleness, processes, request
):
    """One process, synchronous; and the three-process split: two trainers, the student's server sampling ahead, and
    a served teacher whose log-probs are fetched in the background too."""
    import subprocess

    from served_teacher import free_port

    root, _ = tiny_assets
    out = tmp_path / "out"
    command = [
        "-m", "trl_eopd.cli", "train", "--config", "tiny-cpu", "--use_vllm", "true",
        "--vllm_mode", "server", "--vllm_server_base_url", server.url, "--max_staleness", str(max_staleness),
        "--max_steps", "3", "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--output_dir", str(out),
    ]  # fmt: skip
    if processes > 1:
        # torchrun plus `use_cpu` is accelerate's 2-process CPU (gloo) setup: each process asks the server for its
        # rows, the main one pushes the weights.
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                   str(free_port()), *command, "--use_cpu", "true"]  # fmt: skip
        teacher = request.getfixturevalue("teacher_server")
        command += ["--teacher_model_server_url", teacher.url, "--teacher_model_server_timeout", "60"]
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=False,
                          env=_env(TRL_EOPD_TINY_DIR=str(root)), timeout=400)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert STALENESS_METRIC in log and "eopd/vllm_logprob_abs_diff" in log, log[-3000:]
    assert f"{processes} process(es)" in log, log[-3000:]
    if max_staleness:
        assert "eopd/importance_ratio_mean" in log, log[-3000:]
    if processes > 1:
        assert "eopd/teacher_entropy_estimate" in log, log[-3000:]

    prompts = _prompts(student)
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    untrained = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    stop_ids = set(trained.generation_config.eos_token_id or []) | {trained.config.eos_token_id}
    served = _strip_after_stop(_server_greedy(server, prompts), stop_ids)
    assert served == _strip_after_stop(_hf_greedy(trained, prompts), stop_ids)
    assert served != _strip_after_stop(_hf_greedy(untrained, prompts), stop_ids)  # the check can fail


def _trainer(student, teacher, url, tmp_path, *, dataset_rows=12, peft_config=None, **overrides):
    options = {
        "output_dir": str(tmp_path), "use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": url,
        "vllm_server_timeout": 60, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "num_train_epochs": 2, "max_new_tokens": 10, "learning_rate": 5e-2, "lr_scheduler_type": "constant",
        "logging_steps": 1, "bf16": False, "report_to": "none", "save_strategy": "no", "teacher_eos_token": IM_END,
        "reverse_kl_estimator": "sampled", "forward_kl_top_k": 16, "seed": 0, **overrides,
    }  # fmt: skip
    return EOPDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=teacher,
        args=EOPDConfig(**options),
        train_dataset=Dataset.from_list(toy_arithmetic_conversations(dataset_rows)),
        processing_class=AutoTokenizer.from_pretrained(student),
        peft_config=peft_config,
    )


def _record_trained_prompts(trainer) -> list:
    """The prompts of every micro-batch `compute_loss` trains on, in order, and (loss with vs. without the sampler's
    log-probs) for fresh on-policy batches."""
    seen, losses = [], []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        rows = zip(inputs["prompts"], inputs["prompt_attention_mask"], strict=True)
        seen.append([row[mask.bool()].tolist() for row, mask in rows])
        if inputs.get("eopd_rollout_staleness") == 0 and SAMPLER_LOGPROBS in inputs:
            # What the colocated engine hands the loss on an unlogged step: the same completions, no log-probs.
            with torch.no_grad():
                plain = {k: v for k, v in inputs.items() if k not in (SAMPLER_LOGPROBS, "eopd_rollout_staleness")}
                losses.append((compute_loss(model, dict(inputs), *args, **kwargs).detach(),
                               compute_loss(model, plain, *args, **kwargs).detach()))  # fmt: skip
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return seen, losses


def test_staleness_keeps_every_prompt_and_zero_staleness_keeps_the_colocate_loss(server, tiny_assets, student,
                                                                                 tmp_path):  # fmt: skip
    teacher = tiny_assets[1]["teacher"]
    runs = {}
    for staleness in (0, 1):
        trainer = _trainer(student, teacher, server.url, tmp_path / str(staleness), max_staleness=staleness)
        seen, losses = _record_trained_prompts(trainer)
        trainer.train()
        runs[staleness] = (seen, losses, trainer.state.log_history)
    # 12 rows, 2 per micro-batch, 2 micro-batches per step, 2 epochs: 6 steps, 12 micro-batches, each row twice.
    assert len(runs[0][0]) == 12 and runs[1][0] == runs[0][0]
    assert len(runs[0][1]) == 12 and all(torch.equal(with_, without) for with_, without in runs[0][1])
    staleness_logged = [entry.get(STALENESS_METRIC) for entry in runs[1][2] if STALENESS_METRIC in entry]
    # The first window of each epoch is sampled with the current weights, the others one step behind.
    assert staleness_logged == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0], staleness_logged


def test_a_lora_student_sends_its_adapter_and_the_server_follows(server, tiny_assets, student, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(student, tiny_assets[1]["teacher"], server.url, tmp_path, peft_config=lora, num_train_epochs=1,
                       max_staleness=1, learning_rate=0.2)  # fmt: skip
    trainer.train()
    mismatch = [entry["eopd/vllm_logprob_abs_diff"] for entry in trainer.state.log_history
                if "eopd/vllm_logprob_abs_diff" in entry]  # fmt: skip
    assert mismatch and mismatch[0] < 1e-4  # the first window is sampled by the pushed base + adapter
    prompts = _prompts(student)
    merged = trainer.model.merge_and_unload().eval()
    stop_ids = set(merged.generation_config.eos_token_id or []) | {merged.config.eos_token_id}
    served = _strip_after_stop(_server_greedy(server, prompts, model=LORA_ADAPTER_NAME), stop_ids)
    assert served == _strip_after_stop(_hf_greedy(merged, prompts), stop_ids)


def test_a_server_hosting_another_model_is_refused_naming_both(server, tiny_assets, tmp_path):
    teacher = tiny_assets[1]["teacher"]
    with pytest.raises(StudentServerError, match=rf"{server.url} serves .*student.*but the student is .*teacher"):
        _trainer(teacher, teacher, server.url, tmp_path)


def test_prompts_longer_than_the_server_context_are_refused_at_start(server, tiny_assets, student, tmp_path):
    with pytest.raises(ValueError, match=r"with `max_new_tokens=250`.*the student server's `--max-model-len`"):
        _trainer(student, tiny_assets[1]["teacher"], server.url, tmp_path, max_new_tokens=250)


def test_a_server_killed_mid_run_stops_training_and_a_resumed_run_continues(server, tiny_assets, tmp_path):
    """Last in the module: it stops the shared server and starts it again on the same port."""
    import json
    import subprocess

    root, _ = tiny_assets
    output_dir = tmp_path / "out"
    train = [
        sys.executable, "-m", "trl_eopd.cli", "train", "--config", "tiny-cpu", "--use_vllm", "true",
        "--vllm_mode", "server", "--vllm_server_base_url", server.url, "--max_staleness", "1",
        "--vllm_server_retries", "1", "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = _env(TRL_EOPD_TINY_DIR=str(root))
    returncode, log = train_until_checkpoint_then_stop(server, train, env, output_dir, timeout=300)
    assert returncode != 0
    assert f"The student's vLLM server at {server.url} failed at global step" in log, log[-4000:]
    assert "after 2 attempt(s)" in log, log[-4000:]

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    last = checkpoints[-1]
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == int(last.name.split("-")[1])
    AutoModelForCausalLM.from_pretrained(last)  # intact: it loads

    server.start()
    resumed = subprocess.run([*train, "--resume_from_checkpoint", "true"], capture_output=True, text=True, env=env,
                             timeout=400, check=False)  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    final = max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 8
    # The restarted server was sent the resumed run's weights, and ends with the final ones.
    prompts = _prompts(tiny_assets[1]["student"])
    trained = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    stop_ids = set(trained.generation_config.eos_token_id or []) | {trained.config.eos_token_id}
    assert _strip_after_stop(_server_greedy(server, prompts), stop_ids) == _strip_after_stop(
        _hf_greedy(trained, prompts), stop_ids
    )
