"""The vLLM entry of `trl_eopd/_compat.py`: the CPU build's switch for oneDNN weight repacking still exists."""

import vllm._custom_ops as vllm_ops

from trl_eopd import _compat


def test_vllm_cpu_weight_repacking_switch_exists(monkeypatch):
    assert hasattr(vllm_ops, "_supports_onednn"), (
        "_compat.disable_vllm_cpu_weight_repacking: vllm._custom_ops has no `_supports_onednn` any more; find how the "
        "installed vLLM decides to repack CPU linear weights."
    )
    monkeypatch.setattr(vllm_ops, "_supports_onednn", vllm_ops._supports_onednn)
    _compat.disable_vllm_cpu_weight_repacking()
    assert vllm_ops._supports_onednn is False
