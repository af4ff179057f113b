"""How a launched `trl-eopd train` worker ends (trl_eopd/cli/process_exit.py): the interpreter's teardown, where gloo's
leftover threads can abort the process, is skipped; Python's exit handlers and buffered output are not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from trl_eopd.cli.process_exit import launched_worker

# A child whose stdout is a pipe (block-buffered), with an exit handler, and an object that only the interpreter's
# teardown would finalise.
CHILD = textwrap.dedent("""
    import atexit, sys
    from pathlib import Path

    from trl_eopd.cli.process_exit import exit_without_teardown

    marks = Path(sys.argv[1])

    class TornDown:
        def __del__(self):
            with marks.open("a") as f:
                f.write("teardown\\n")

    kept = TornDown()
    atexit.register(lambda: marks.open("a").write("atexit\\n"))
    print("buffered line", end="")
    sys.stderr.write("buffered error")
    exit_without_teardown(0)
    print("never reached")
""")


def test_exit_runs_exit_handlers_flushes_output_and_skips_teardown(tmp_path):
    marks = tmp_path / "marks.txt"
    # Block-buffered output, as a launched worker's usually is, so that a missing flush would lose it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(marks)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "buffered line"
    assert proc.stderr.endswith("buffered error")
    assert marks.read_text().splitlines() == ["atexit"]


@pytest.mark.parametrize(("environ", "expected"), [({"LOCAL_RANK": "1"}, True), ({}, False)])
def test_launched_worker_is_read_from_the_launcher_environment(monkeypatch, environ, expected):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert launched_worker() is expected
