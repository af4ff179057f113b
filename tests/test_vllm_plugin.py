"""The teacher-entropy vLLM plugin's selection and start-up, without vLLM (tests/vllm_engine/ runs it in a server)."""

from __future__ import annotations

import configparser
import importlib.metadata
import math
import os
import sys
from pathlib import Path

import pytest

from trl_eopd.vllm_plugin import PLUGIN_NAME, selected, serve

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "value, expected",
    [(None, False), ("", False), ("lora_filesystem_resolver", False), (f"other, {PLUGIN_NAME}", True),
     (PLUGIN_NAME, True), (f"{PLUGIN_NAME}_2", False)],
)  # fmt: skip
def test_the_plugin_patches_only_when_vllm_plugins_names_it(value, expected):
    environ = {} if value is None else {"VLLM_PLUGINS": value}
    assert selected(environ) is expected


def test_the_bundled_entry_point_record_declares_what_pyproject_declares():
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    (distribution,) = importlib.metadata.distributions(path=[str(serve.ENTRY_POINT_DIR)])
    group = serve.GENERAL_PLUGINS_GROUP
    bundled = {entry.name: entry.value for entry in distribution.entry_points if entry.group == group}
    assert bundled == declared == {PLUGIN_NAME: "trl_eopd.vllm_plugin:register"}
    parser = configparser.ConfigParser()
    parser.read(next(serve.ENTRY_POINT_DIR.glob("*.dist-info")) / "entry_points.txt")
    assert list(parser.sections()) == [serve.GENERAL_PLUGINS_GROUP]


def _installed(names_by_group):
    return lambda group: names_by_group.get(group, [])


def test_serving_without_installation_selects_the_plugin_and_keeps_every_other_plugin(monkeypatch):
    monkeypatch.setattr(serve, "_installed_plugin_names",
                        _installed({"vllm.general_plugins": ["lora_filesystem_resolver"],
                                    "vllm.platform_plugins": ["some_platform"]}))  # fmt: skip
    env = serve.server_environment({"PYTHONPATH": "/elsewhere", "OTHER": "1"})
    # vLLM loads every installed plugin while VLLM_PLUGINS is unset: selecting this one must not drop the others.
    assert env["VLLM_PLUGINS"].split(",") == ["lora_filesystem_resolver", "some_platform", PLUGIN_NAME]
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(serve.ENTRY_POINT_DIR), str(REPO), "/elsewhere"]
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0" and env["OTHER"] == "1"


def test_serving_an_installed_plugin_keeps_the_users_selection_and_path(monkeypatch):
    monkeypatch.setattr(serve, "_installed_plugin_names", _installed({"vllm.general_plugins": [PLUGIN_NAME, "x"]}))
    env = serve.server_environment({"VLLM_PLUGINS": "x", "VLLM_USE_V2_MODEL_RUNNER": "1"})
    assert env["VLLM_PLUGINS"] == f"x,{PLUGIN_NAME}" and "PYTHONPATH" not in env
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "1"  # the user's choice stands (the plugin then logs that it cannot act)
    env = serve.server_environment({"VLLM_PLUGINS": f"{PLUGIN_NAME},x"})
    assert env["VLLM_PLUGINS"] == f"{PLUGIN_NAME},x"


def test_the_serve_command_becomes_the_vllm_server_with_its_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    serve.main(["--model", "DIR", "--port", "8000"])
    ((executable, argv, env),) = calls
    assert executable == sys.executable
    assert argv == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "DIR", "--port", "8000"]
    assert PLUGIN_NAME in env["VLLM_PLUGINS"].split(",")


@pytest.mark.parametrize("mode", ["processed_logprobs", "raw_logprobs", "processed_logits", "raw_logits"])
def test_the_plugins_entropy_is_the_full_distributions_with_masked_tokens_counting_zero(mode):
    import torch

    from trl_eopd.vllm_plugin.patches import _ENTROPY_ROWS, entropy_of_rows

    rows = _ENTROPY_ROWS + 5  # two blocks of rows, the last one short
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, 50, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 8.0, rows)[:, None]
    logits[::3, :7] = -math.inf  # tokens vLLM masked: probability 0, and -inf as log-probability
    logits += 3.0  # unnormalised, as in the `*_logits` modes
    log_probs = logits.log_softmax(-1)
    expected = -torch.where(torch.isfinite(log_probs), log_probs.exp() * log_probs, 0.0).sum(-1)
    scores = logits if mode.endswith("_logits") else log_probs
    entropy = entropy_of_rows(scores.float(), mode)
    assert entropy.dtype == torch.float64
    torch.testing.assert_close(entropy, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "version, tested", [("0.32.0", True), ("0.32.1+cpu", True), ("0.31.2", False), ("0.33.0", False), ("0.3", False)]
)
def test_the_plugin_patches_only_the_vllm_versions_it_was_tested_with(version, tested):
    from trl_eopd import _compat
    from trl_eopd.vllm_plugin.patches import vllm_version_is_tested

    assert _compat.VLLM_ENTROPY_PLUGIN_TESTED_VERSIONS == ("0.32",)  # update the cases with the pin
    assert vllm_version_is_tested(version) is tested


def test_the_plugin_and_the_client_import_nothing_heavy():
    import subprocess

    code = (
        "import sys, trl_eopd.vllm_plugin, trl_eopd.vllm_plugin.serve; "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'vllm') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout  # fmt: skip
    assert out.strip() == "[]"
