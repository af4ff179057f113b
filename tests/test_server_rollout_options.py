"""Server-mode rollout options (`vllm_mode="server"`, `max_staleness`, `weight_sync_steps`, `importance_ratio_cap`)
and the start-up check that needs no server: one that does not answer. The real server is exercised in
tests/vllm_engine/test_student_server.py."""

from __future__ import annotations

import time

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from trl_eopd import EOPDConfig, EOPDTrainer
from trl_eopd.rollouts.student_server import StudentServerError
from trl_eopd.tiny import save_tiny_setup

SERVER = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://127.0.0.1:9"}


def _config(tmp_path, **kwargs):
    return EOPDConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **kwargs)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_staleness", -1),
        ("max_staleness", 1.5),
        ("weight_sync_steps", 0),
        ("importance_ratio_cap", 0.5),
        ("importance_ratio_cap", float("inf")),
        ("vllm_server_retries", -1),
    ],
)
def test_invalid_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"`{field}"):
        _config(tmp_path, **SERVER, **{field: value})


def test_staleness_needs_server_mode(tmp_path, monkeypatch):
    monkeypatch.setattr("trl_eopd.config.is_vllm_installed", lambda: True)
    for options in ({}, {"use_vllm": True}):
        with pytest.raises(ValueError, match=r"`max_staleness=1`.*only apply to rollouts on the student's own server"):
            _config(tmp_path, max_staleness=1, **options)


def test_weight_sync_steps_cannot_exceed_the_staleness_bound(tmp_path):
    with pytest.raises(ValueError, match=r"`weight_sync_steps=3`.*at most `max_staleness \+ 1` \(2\)"):
        _config(tmp_path, **SERVER, max_staleness=1, weight_sync_steps=3)
    assert _config(tmp_path, **SERVER, max_staleness=1, weight_sync_steps=2).weight_sync_steps == 2


def test_server_mode_needs_no_vllm_in_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setattr("trl_eopd.config.is_vllm_installed", lambda: False)
    assert _config(tmp_path, **SERVER).vllm_mode == "server"
    with pytest.raises(ValueError, match="needs vLLM"):
        _config(tmp_path, use_vllm=True, vllm_mode="colocate")


def test_a_student_server_that_does_not_answer_names_the_url_and_the_timeout(tmp_path):
    tiny = save_tiny_setup(tmp_path / "tiny", num_examples=4)
    args = _config(tmp_path / "run", **SERVER, vllm_server_timeout=1.0, max_steps=1)
    start = time.monotonic()
    with pytest.raises(StudentServerError, match=r"http://127.0.0.1:9 did not answer GET /health within "
                                                 r"`vllm_server_timeout=1` seconds.*VLLM_SERVER_DEV_MODE=1"):  # fmt: skip
        EOPDTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=args,
                    train_dataset=load_dataset("json", data_files=tiny["dataset"], split="train"),
                    processing_class=AutoTokenizer.from_pretrained(tiny["student"]))  # fmt: skip
    assert time.monotonic() - start < 30  # bounded, not a hang


def test_server_rollouts_refuse_an_fsdp_launch_before_any_push(monkeypatch):
    from types import SimpleNamespace

    from trl_eopd.rollouts import build_rollout_source

    trainer = SimpleNamespace(args=SimpleNamespace(use_vllm=True, vllm_mode="server", fsdp=""))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match=r"does not push FSDP-sharded weights yet: use `vllm_mode='colocate'`"):
        build_rollout_source(trainer)
