"""The tree stays clean under the repository's ruff configuration (`[tool.ruff]` in pyproject.toml).

ruff is pinned in the `test` extra, so CI always has it: a missing ruff fails here instead of skipping, otherwise a
lint error could land unnoticed on a machine that lacks it.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pinned_ruff() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"ruff==([0-9.]+)"', text)
    assert match, "pyproject.toml: the test extra must pin ruff (ruff==X.Y.Z)"
    return match.group(1)


def _ruff(*args: str) -> subprocess.CompletedProcess:
    try:
        installed = importlib.metadata.version("ruff")
    except importlib.metadata.PackageNotFoundError:
        raise AssertionError('ruff is not installed: pip install -e ".[test]" brings the pinned version') from None
    assert installed == _pinned_ruff(), (
        f"ruff {installed} is installed, the test extra pins {_pinned_ruff()}: another version applies other rules"
    )
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def test_ruff_check_is_clean():
    proc = _ruff("check", "--no-cache", ".")
    assert proc.returncode == 0, f"`ruff check .` found problems:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"


def test_ruff_format_is_clean():
    proc = _ruff("format", "--check", "--no-cache", ".")
    assert proc.returncode == 0, (
        f"`ruff format --check .` would reformat files (run `ruff format .`):\n{proc.stdout[-4000:]}{proc.stderr}"
    )
