"""A multi-process launch whose gradients nothing would synchronise stops before training, with one line.

The launches are real: `accelerate launch` with the shipped `fsdp2.yaml` and two CPU processes, where accelerate takes
no FSDP path (each process sees world size 1), and the same with `--ddp_backend gloo` (the processes form a group, yet
distributed_type stays NO and nothing averages their gradients). About 20 s each on two cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trl_eopd.cli.recipes import accelerate_config_path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eopd.py"
WORKING_LAUNCH = "DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate/zero2.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "cause"),
    [
        ((), "because of its FSDP config (`distributed_type: FSDP`), which accelerate applies only on GPUs"),
        (("--ddp_backend", "gloo"), "`ddp_backend: gloo` joins the processes, but with distributed_type NO"),
    ],
    ids=["fsdp2-config", "fsdp2-config-gloo"],
)
def test_two_process_fsdp2_launch_on_cpu_stops_before_training(tiny_assets, tmp_path, extra, cause):
    root, _ = tiny_assets
    out = tmp_path / "out"
    env = {**os.environ, "TRL_EOPD_TINY_DIR": str(root), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_path("fsdp2")),
        "--mixed_precision", "no", "--num_processes", "2", "--main_process_port", str(_free_port()),
        str(SCRIPT), "--config", "tiny-cpu", "--output_dir", str(out), "--max_steps", "1", *extra,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    # The process count is said only once every check has passed: the error stands alone.
    assert "process(es), device=" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("trl-eopd train: error:")]
    # One line, from rank 0 only, naming the launch, the cause and the CPU launch that works.
    assert len(errors) == 1, log[-3000:]
    assert "2 processes were launched (WORLD_SIZE=2) but accelerate sees distributed_type NO" in errors[0]
    assert cause in errors[0]
    assert WORKING_LAUNCH in errors[0]
    # Stopped before any model loaded: nothing trained, nothing saved.
    assert "training tiny" not in log and "saved the student" not in log
    assert not out.exists()


def _trainer(tiny_assets, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer

    _, paths = tiny_assets
    args = EOPDConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to=[], save_strategy="no", max_steps=1)
    return lambda: EOPDTrainer(
        model=paths["student"],
        teacher_model=paths["teacher"],
        args=args,
        train_dataset=load_dataset("json", data_files=paths["train"], split="train"),
        processing_class=AutoTokenizer.from_pretrained(paths["student"]),
    )


def test_trainer_refuses_a_launch_that_would_train_apart(tiny_assets, tmp_path, monkeypatch):
    """Python users, without the CLI: the trainer itself stops, before loading a model."""
    build = _trainer(tiny_assets, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what a launcher tells each of two processes; accelerate here sees one
    with pytest.raises(ValueError, match=r"2 processes were launched \(WORLD_SIZE=2\) but accelerate sees "):
        build()


def test_trainer_refuses_fsdp1_and_names_fsdp2(tiny_assets, tmp_path, monkeypatch):
    build = _trainer(tiny_assets, tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(
        ValueError, match=r"FSDP version 1 .*Use FSDP2: `--config_file recipes/accelerate/fsdp2\.yaml`"
    ):
        build()
