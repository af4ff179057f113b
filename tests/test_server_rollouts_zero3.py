"""Rollouts on the student's own vLLM server with a ZeRO-3 student on two processes (`accelerate launch`, zero3.yaml).

DeepSpeed lives in the main environment and vLLM in its own (see tests/test_vllm_environment.py), so the trainers run
here and the student's server runs with the vLLM environment's Python. Skipped where that environment is missing,
except under `CI=true`. Every process takes part in one gather per weight push; after training the server's greedy
completions equal the saved student's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vllm_engine"))


def _vllm_python() -> str | None:
    path = Path(os.environ.get("TRL_EOPD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    return str(path) if path.exists() else None


@pytest.fixture(scope="module")
def server(tiny_assets, tmp_path_factory):
    python = _vllm_python()
    if python is None:
        message = "no vLLM environment for the student's server: set TRL_EOPD_VLLM_PYTHON or run .ci/run"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    from served_teacher import TeacherServerProcess

    process = TeacherServerProcess(tiny_assets[1]["student"], log_dir=tmp_path_factory.mktemp("student-zero3"),
                                   python=python, flags=["--logprobs-mode", "processed_logprobs"],
                                   env={"VLLM_SERVER_DEV_MODE": "1"}).start()  # fmt: skip
    yield process
    process.stop()


def test_zero3_student_on_two_processes_with_server_rollouts(server, tiny_assets, tmp_path):
    import requests
    import torch
    from served_teacher import free_port
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd.cli.recipes import accelerate_config_path
    from trl_eopd.tiny import toy_arithmetic_conversations

    root, paths = tiny_assets
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path("zero3")),
        "--mixed_precision", "no", "--num_processes", "2", "--main_process_port", str(free_port()),
        str(REPO / "scripts" / "eopd.py"),
        "--config", "tiny-cpu", "--output_dir", str(out), "--max_steps", "3", "--learning_rate", "0.05",
        "--lr_scheduler_type", "constant", "--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_base_url",
        server.url, "--max_staleness", "1",
    ]  # fmt: skip
    env = {**os.environ, "TRL_EOPD_TINY_DIR": str(root), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "MASTER_PORT": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "distributed_type=DEEPSPEED" in log and "eopd/rollout_staleness" in log, log[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    rows = toy_arithmetic_conversations(4, seed=7)
    prompts = [tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for row in rows]  # fmt: skip
    model = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    answer = requests.post(f"{server.url}/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 8,
                           "temperature": 0.0, "return_token_ids": True}, timeout=60).json()  # fmt: skip
    served = [choice["token_ids"] for choice in sorted(answer["choices"], key=lambda c: c["index"])]
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = trained.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)  # fmt: skip
            expected.append(generated[0, len(prompt) :].tolist())

    def until_stop(completions):  # vLLM stops at the end token; `generate` was told not to
        stop = set(trained.generation_config.eos_token_id or []) | {trained.config.eos_token_id}
        return [c[: next((i + 1 for i, t in enumerate(c) if t in stop), len(c))] for c in completions]

    assert until_stop(served) == until_stop(expected)
