"""A bfloat16 CPU engine after `_compat.disable_vllm_cpu_weight_repacking`: every linear layer keeps a loadable weight,
TRL's weight sync (`load_weights`) goes through, and the engine computes with what was loaded.

bfloat16 is what TRL's engines run in (it passes no dtype, and vLLM's "auto" serves a float32 checkpoint in bfloat16),
and the only dtype where CPUs with AMX take vLLM's "sgl-kernel" repacking path; float32 engines never do. The engine is
built with that path's decision made as on an AMX CPU (`sgl_kernel_as_on_amx`), so this test fails on an AMD machine
too when the switch misses the path: where vLLM's kernel library has the path's op (AVX-512-BF16 CPUs) the engine drops
the loaders as on Intel; where it has not (AVX2-only CPUs, `engine_paths`) the engine stops on the missing op. With the
switch the decision is never consulted, so the test runs and asserts the weight sync on every CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_eopd import _compat
from trl_eopd.tiny import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture
def checkpoint(tmp_path):
    tokenizer = build_tiny_tokenizer()
    # Heads 32 wide (the CPU engine's smallest) and an output layer of its own, so that zeroing it is all it changes.
    model = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, tie_word_embeddings=False, seed=5)  # fmt: skip
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path), model, tokenizer


def test_bfloat16_engine_keeps_loadable_weights_and_uses_synced_ones(checkpoint, sgl_kernel_as_on_amx):
    from vllm import LLM, SamplingParams

    path, model, tokenizer = checkpoint
    _compat.disable_vllm_cpu_weight_repacking()
    try:
        llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=64, seed=0)
    except AttributeError as error:
        if "convert_weight_packed" not in str(error):
            raise
        pytest.fail(f"the dispatcher reached the sgl-kernel path, whose op this CPU's vLLM kernels lack: {error}")
    try:
        # Where TRL's colocate sync loads the student's weights.
        engine_model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        dispatched = {name: module for name, module in engine_model.named_modules() if hasattr(module, "cpu_linear")}
        assert "lm_head" in dispatched and any("qkv_proj" in name for name in dispatched), sorted(dispatched)
        lost = [
            name
            for name, module in dispatched.items()
            if module.weight.numel() == 0 or not hasattr(module.weight, "weight_loader")
        ]
        assert not lost, f"these layers lost their weight or its loader: {lost}"

        # TRL's sync, one parameter at a time, with a zero output layer: every next token becomes equally likely, in
        # bfloat16 as exactly as in float32. An output layer computing with a packed copy of its first weights would
        # still prefer some tokens.
        for name, parameter in model.named_parameters():
            weights = torch.zeros_like(parameter) if name == "lm_head.weight" else parameter.detach()
            engine_model.load_weights([(name, weights)])
        prompt = tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]
        sampling = SamplingParams(max_tokens=6, min_tokens=6, temperature=1.0, logprobs=0, seed=0)
        (output,) = llm.generate([{"prompt_token_ids": prompt}], sampling, use_tqdm=False)
        logprobs = [
            step[token].logprob for step, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)
        ]
        assert len(logprobs) == 6
        uniform = -math.log(model.config.vocab_size)
        assert logprobs == pytest.approx([uniform] * 6, abs=1e-4)
    finally:
        _compat.shut_down_vllm_engine(llm)
    # The engine made the default process group itself here; shutting down removes it with the engine's own groups.
    assert not torch.distributed.is_initialized()
