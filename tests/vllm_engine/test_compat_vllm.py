"""The vLLM entries of `trl_eopd/_compat.py`, checked against the installed vLLM: every name they rely on still exists,
and the CPU switch keeps a linear layer loadable on each repacking path of vLLM's CPU dispatcher.

Each path is forced here, so that a machine without AMX checks the "sgl-kernel" path too: forgetting that path went
unnoticed while the project ran on AMD EPYC machines only, and failed on the first Intel Xeon with AMX. A path the
engine cannot take on this CPU (`engine_paths`: on AVX2-only CPUs neither exists) is not shown to repack; the switch
is checked on every CPU with each path's decision forced, since it keeps the dispatcher from reaching either.
"""

import importlib
import importlib.metadata
import inspect
import sys
import warnings

import pytest
import torch
import vllm._custom_ops as vllm_ops
from engine_paths import engine_path_skip

from trl_eopd import _compat

ENTRY = "_compat.disable_vllm_cpu_weight_repacking"
gemm = importlib.import_module(_compat.VLLM_CPU_GEMM_MODULE)


def test_cpu_gemm_dispatcher_exists_with_its_signature():
    dispatcher = getattr(gemm, _compat.VLLM_CPU_GEMM_DISPATCHER, None)
    assert dispatcher is not None, (
        f"{ENTRY}: {_compat.VLLM_CPU_GEMM_MODULE} has no `{_compat.VLLM_CPU_GEMM_DISPATCHER}` any more; find where "
        "the installed vLLM picks the CPU kernel of a linear layer."
    )
    assert list(inspect.signature(dispatcher).parameters) == ["layer", "remove_weight"], (
        f"{ENTRY}: `{_compat.VLLM_CPU_GEMM_DISPATCHER}` no longer takes (layer, remove_weight)."
    )
    assert hasattr(gemm, "cpu_unquantized_gemm"), (
        f"{ENTRY}: {_compat.VLLM_CPU_GEMM_MODULE} has no `cpu_unquantized_gemm`, which calls `layer.cpu_linear`."
    )


@pytest.mark.parametrize(
    "module, name",
    [(gemm, "check_cpu_sgl_kernel"), (vllm_ops, "_supports_onednn")],
    ids=["sgl-kernel", "oneDNN"],
)
def test_repacking_decisions_exist(module, name):
    # The switch does not set these, but the tests below force them to reach each path on any machine.
    assert hasattr(module, name), (
        f"{ENTRY}: {module.__name__} has no `{name}` any more; read `{_compat.VLLM_CPU_GEMM_DISPATCHER}` again for "
        "the CPU repacking paths of the installed vLLM, and update this test's list."
    )


@pytest.fixture
def force_path(monkeypatch, sgl_kernel_as_on_amx):
    """Send the dispatcher down one repacking path: `"sgl-kernel"` (as on AMX) or `"oneDNN"`."""

    def force(path: str) -> None:
        sgl = path == "sgl-kernel"
        monkeypatch.setattr(gemm, "check_cpu_sgl_kernel", sgl_kernel_as_on_amx if sgl else (lambda n, k, dtype: False))
        monkeypatch.setattr(vllm_ops, "_supports_onednn", not sgl)

    return force


def _weight() -> torch.Tensor:
    return torch.randn(64, 64, dtype=torch.bfloat16)


def _dispatched_layer(remove_weight: bool = True) -> torch.nn.Module:
    """A bfloat16 linear layer as vLLM holds it, after the CPU dispatcher has chosen its kernel."""
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(_weight(), requires_grad=False)
    layer.weight.weight_loader = lambda param, loaded: param.data.copy_(loaded)
    getattr(gemm, _compat.VLLM_CPU_GEMM_DISPATCHER)(layer, remove_weight=remove_weight)
    return layer


def _computes_with(layer, weight) -> bool:
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    return torch.equal(gemm.cpu_unquantized_gemm(layer, x, weight), torch.nn.functional.linear(x, weight))


@pytest.fixture
def restore_dispatcher(monkeypatch):
    """vLLM's own dispatcher during the test (an engine test may have switched it already), the current one after."""
    current = getattr(gemm, _compat.VLLM_CPU_GEMM_DISPATCHER)
    monkeypatch.setattr(gemm, _compat.VLLM_CPU_GEMM_DISPATCHER, getattr(current, "__wrapped__", current))


@pytest.mark.parametrize("path", ["sgl-kernel", "oneDNN"])
def test_each_repacking_path_repacks_without_the_switch(path, force_path, restore_dispatcher):
    # Shows that forcing reaches the path; should vLLM stop repacking there, the entry may be obsolete.
    if reason := engine_path_skip(path, _weight()):
        pytest.skip(reason)
    force_path(path)
    layer = _dispatched_layer()
    assert not hasattr(layer.weight, "weight_loader"), f"{ENTRY}: the {path} path no longer drops the weight"
    kept = _dispatched_layer(remove_weight=False)  # how the output layer is dispatched
    assert not _computes_with(kept, _weight()), f"{path} computes with the weight"


@pytest.mark.parametrize("path", ["sgl-kernel", "oneDNN"])
def test_switch_keeps_every_path_on_loadable_weights(path, force_path, restore_dispatcher):
    force_path(path)
    _compat.disable_vllm_cpu_weight_repacking()
    _compat.disable_vllm_cpu_weight_repacking()  # idempotent: one wrapper, not two
    for remove_weight in (True, False):
        layer = _dispatched_layer(remove_weight)
        assert layer.weight.shape == (64, 64) and hasattr(layer.weight, "weight_loader"), (path, remove_weight)
        # It computes with the weight it is handed, so what a sync loads is what the engine uses.
        assert _computes_with(layer, _weight()), (path, remove_weight)
    wrapped = getattr(getattr(gemm, _compat.VLLM_CPU_GEMM_DISPATCHER), "__wrapped__", None)
    assert not getattr(wrapped, "_trl_eopd_plain", False)


def test_engine_core_clients_shut_down():
    from vllm.v1.engine.core_client import EngineCoreClient, InprocClient, MPClient

    for client in (EngineCoreClient, InprocClient, MPClient):
        assert callable(getattr(client, "shutdown", None)), (
            f"_compat.shut_down_vllm_engine: vLLM's {client.__name__} has no `shutdown()` any more."
        )


def test_the_entropy_plugins_targets_exist_with_their_signatures_on_a_tested_version():
    """`_compat.VLLM_ENTROPY_PLUGIN_TARGETS`: what trl_eopd/vllm_plugin/patches.py wraps, as the plugin checks it."""
    import vllm

    from trl_eopd.vllm_plugin import patches

    assert patches.vllm_version_is_tested(vllm.__version__), (
        f"_compat.VLLM_ENTROPY_PLUGIN_TESTED_VERSIONS: vLLM {vllm.__version__} is not listed; run "
        "tests/vllm_engine/test_teacher_entropy_plugin.py against it, then add its minor version."
    )
    assert len(patches._resolve_targets()) == len(_compat.VLLM_ENTROPY_PLUGIN_TARGETS)


def test_trl_warns_of_the_installed_vllm_and_every_trl_module_gets_the_quiet_check():
    import trl.import_utils as trl_imports

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the warning itself, as these modules load with the loud check
        import trl.generation.vllm_client  # noqa: F401  (modules that took TRL's check by name)
        from trl.generation import vllm_generation

    entry = "_compat.trl_vllm_version_check_quiet"
    _compat.trl_vllm_version_check_quiet()
    quiet = trl_imports.is_vllm_available
    installed = importlib.metadata.version(trl_imports.PACKAGE_DISTRIBUTION_MAPPING["vllm"][0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.__wrapped__()
    assert caught, f"{entry}: TRL no longer warns of vLLM {installed}; the entry can go."
    assert [w.category for w in caught] == [UserWarning] and installed in str(caught[0].message), (
        f"{entry}: TRL's is_vllm_available now warns otherwise: {[str(w.message) for w in caught]}"
    )
    holders = [name for name, module in sys.modules.items()
               if name.startswith("trl.") and getattr(module, "is_vllm_available", None) is quiet.__wrapped__]  # fmt: skip
    assert not holders, f"{entry}: these TRL modules still hold the warning check: {holders}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert vllm_generation.is_vllm_available()
    assert not caught, [str(w.message) for w in caught]
