"""Which of vLLM's CPU repacking paths the engine can take on this machine, as the engine itself finds out.

vLLM's CPU dispatcher (`dispatch_cpu_unquantized_gemm`) repacks a linear layer's weight by the "sgl-kernel" path or by
oneDNN, and otherwise computes with plain `F.linear`. Whether a path exists here is read from the engine, never from a
list of CPU names or flags: vLLM loads one of three kernel libraries for an x86 CPU, and only the AVX-512-BF16 one
registers the sgl-kernel op (`torch.ops._C.convert_weight_packed`); oneDNN may be present yet unable to build a
bfloat16 matmul (on AVX2-only CPUs), which vLLM answers by falling back to `F.linear`.

A test of a path skips where the engine cannot take it, with a reason starting with `ENGINE_PATH_SKIP`; the main
suite's tests/test_vllm_environment.py accepts those skips and no others.
"""

from __future__ import annotations

ENGINE_PATH_SKIP = "vLLM's CPU engine does not take the"


def why_engine_cannot_take(path: str, weight) -> str | None:
    """Why the dispatcher cannot repack `weight` by `path` (`"sgl-kernel"` or `"oneDNN"`) here; None where it can."""
    import torch
    import vllm._custom_ops as ops  # loads the kernel library vLLM picks for this CPU, as the engine does
    from vllm.platforms import CpuArchEnum, current_platform

    if path == "sgl-kernel":
        if not hasattr(torch.ops._C, "convert_weight_packed"):
            return "the kernel library vLLM loaded for this CPU has no torch.ops._C.convert_weight_packed"
        return None
    if path == "oneDNN":
        if not ops._supports_onednn:
            return "the kernel library vLLM loaded for this CPU has no oneDNN matmul"
        if current_platform.get_cpu_architecture() == CpuArchEnum.POWERPC:
            return "vLLM does not use oneDNN for linear layers on POWER"
        try:
            # What the dispatcher tries before it falls back to F.linear.
            ops.create_onednn_mm(weight.t(), 32)
        except RuntimeError as error:
            return f"oneDNN cannot build a {weight.dtype} matmul here ({str(error).split('. ')[0]})"
        return None
    raise ValueError(f"unknown repacking path {path!r}")


def engine_path_skip(path: str, weight) -> str | None:
    """The reason to skip a test of `path` here (None: run it)."""
    why = why_engine_cannot_take(path, weight)
    return None if why is None else f"{ENGINE_PATH_SKIP} {path} path on this CPU: {why}"
