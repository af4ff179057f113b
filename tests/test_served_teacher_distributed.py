"""A served teacher with a ZeRO-3 student on two processes: `accelerate launch` with the packaged zero3.yaml, on CPU.

DeepSpeed lives in the main environment and vLLM in its own (see tests/test_vllm_environment.py), so the trainers run
here and the teacher's vLLM server runs with the vLLM environment's Python. Skipped where that environment is
missing, except under `CI=true`.
"""

from __future__ import annotations

import json
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
def server(tmp_path_factory):
    python = _vllm_python()
    if python is None:
        message = "no vLLM environment for the teacher server: set TRL_EOPD_VLLM_PYTHON or run .ci/run"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    from served_teacher import TeacherServerProcess

    from trl_eopd.tiny import build_servable_tiny_teacher, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("served-zero3")
    tokenizer = build_tiny_tokenizer()
    build_servable_tiny_teacher(tokenizer).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    process = TeacherServerProcess(str(root / "teacher"), log_dir=root / "logs", python=python).start()
    yield process
    process.stop()


def test_zero3_lora_student_on_two_processes_with_a_served_teacher(server, tiny_assets, tmp_path):
    from served_teacher import free_port

    from trl_eopd.cli.recipes import accelerate_config_path

    root, _ = tiny_assets
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path("zero3")),
        "--mixed_precision", "no", "--num_processes", "2", "--main_process_port", str(free_port()),
        str(REPO / "scripts" / "eopd.py"),
        "--config", "tiny-cpu", "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps",
        "--save_steps", "2", "--teacher_model_server_url", server.url, "--use_peft", "true", "--lora_r", "4",
        "--lora_target_modules", "q_proj", "v_proj",
    ]  # fmt: skip
    env = {**os.environ, "TRL_EOPD_TINY_DIR": str(root), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "MASTER_PORT": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "distributed_type=DEEPSPEED" in log and "eopd/teacher_entropy_estimate" in log
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert all(0.0 <= entry["eopd/high_entropy_ratio"] <= 1.0 for entry in logged)
    assert (out / "adapter_model.safetensors").exists()
