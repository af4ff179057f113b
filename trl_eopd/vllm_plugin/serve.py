"""Start vLLM's OpenAI-compatible server with the teacher-entropy plugin selected, trl-eopd installed or not.

    python -m trl_eopd.vllm_plugin.serve --model TEACHER --max-logprobs -1 --logprobs-mode processed_logprobs ...

takes exactly `python -m vllm.entrypoints.openai.api_server`'s arguments and replaces itself with that command (same
PID), in an environment where:

- `VLLM_PLUGINS` names the plugin. When it was unset (vLLM then loads every installed plugin), it also names every
  other installed plugin of the groups it filters, so that selecting this one deselects nothing;
- if trl-eopd is not installed in this environment (only importable, e.g. from `PYTHONPATH`), `PYTHONPATH` gains
  the folder holding the `trl_eopd` package and `entry_point/`, a distribution record that declares the plugin's entry
  point: vLLM finds plugins through installed entry points only, in each of its processes;
- `VLLM_USE_V2_MODEL_RUNNER` is `0` unless set: the plugin patches the V1 model runner (the only one on CPU, and
  still shipped for GPUs).
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from . import PLUGIN_NAME

GENERAL_PLUGINS_GROUP = "vllm.general_plugins"
# The entry-point groups that `VLLM_PLUGINS` filters and that vLLM loads whole while it is unset (`vllm.plugins`).
_FILTERED_GROUPS = (GENERAL_PLUGINS_GROUP, "vllm.platform_plugins", "vllm.io_processor_plugins",
                    "vllm.stat_logger_plugins")  # fmt: skip
ENTRY_POINT_DIR = Path(__file__).resolve().parent / "entry_point"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _installed_plugin_names(group: str) -> list[str]:
    return [entry.name for entry in entry_points(group=group)]


def server_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment a server needs for the plugin, from `environ` (see the module docstring)."""
    env = dict(environ)
    if PLUGIN_NAME not in _installed_plugin_names(GENERAL_PLUGINS_GROUP):
        paths = [str(ENTRY_POINT_DIR), str(_PACKAGE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if "VLLM_PLUGINS" in env:
        names = [name for name in env["VLLM_PLUGINS"].split(",") if name.strip()]
    else:
        names = [name for group in _FILTERED_GROUPS for name in _installed_plugin_names(group)]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*names, PLUGIN_NAME]))
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return env


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    env = server_environment(dict(os.environ))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", SERVER_MODULE, *argv], env)


if __name__ == "__main__":
    main()
