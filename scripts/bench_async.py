"""Synchronous vs. asynchronous rollouts: a colocated engine, the student's own server, and the server overlapped.

Three runs of `EOPDTrainer.train()` on bench_rollouts.py's models (random weights, built locally, no downloads), fully
on-policy, every completion forced to `--new-tokens` tokens:

- `colocate`: vLLM inside the training process (`vllm_mode="colocate"`), sampling and training taking turns on both
  cores;
- `server`: the student's own vLLM server (`vllm_mode="server"`, `max_staleness=0`), pinned to core 0, the trainer
  pinned to core 1; synchronous;
- `async`: the same two processes with `max_staleness=1`: the next window is sampled while the current one trains.

A step is one optimizer step of the Trainer's own loop (rollout, weight push, teacher and student passes, backward,
optimizer). Printed per run: the median step time, tokens sampled per second, the time spent pushing weights per step,
and the trainer process's peak resident memory (for `colocate` it includes the engine). The last line compares the
async step with the faster synchronous one. Needs the vLLM environment (docs/vllm.md):

    PYTHONPATH=. .venv-vllm/bin/python scripts/bench_async.py --repeats 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

RUNS = ("colocate", "server", "async")


def parse_args(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_rollouts.py's models and workload
    from bench_rollouts import add_workload_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--repeats", type=int, default=4, help="Timed optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    return parser.parse_args(argv)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, workdir: str, core: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = ["taskset", "-c", str(core), sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--logprobs-mode",
               "processed_logprobs", "--max-model-len", "1024", "--enforce-eager"]  # fmt: skip
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": str(core), "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with open(os.path.join(workdir, "server.log"), "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   cwd=workdir)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the student's server exited; see {workdir}/server.log")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(1.0)
    raise RuntimeError("the student's server did not come up within 600 s")


def stop_server(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def run(name, args, tokenizer, paths, dataset, workdir, url=None):
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from trl_eopd import EOPDConfig, EOPDTrainer

    steps = args.warmup + args.repeats
    rollout = {"use_vllm": True, "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": 1024}
    if name != "colocate":
        rollout.update(vllm_mode="server", vllm_server_base_url=url, max_staleness=1 if name == "async" else 0,
                       vllm_server_timeout=600)  # fmt: skip
    config = EOPDConfig(
        output_dir=os.path.join(workdir, name), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=steps, max_new_tokens=args.new_tokens,
        lmbda=1.0, reverse_kl_estimator="sampled", forward_kl_top_k=16, learning_rate=1e-5, bf16=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=args.seed, max_length=256, **rollout,
    )  # fmt: skip
    trainer = EOPDTrainer(
        model=AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32),
        args=config, train_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip
    source = trainer._rollouts
    push_seconds = [0.0]
    if name == "colocate":
        source.generation.generation_kwargs["min_tokens"] = args.new_tokens  # forced length
        timed, attribute = source.generation, "sync_weights"
    else:
        server = source.server
        post = server._post_with_retries

        def forced(path, payload, global_step, **kwargs):  # forced length, as `min_new_tokens` does for `generate`
            if payload.get("max_tokens", 0) > 1:
                payload = {**payload, "min_tokens": args.new_tokens}
            return post(path, payload, global_step, **kwargs)

        server._post_with_retries = forced
        timed, attribute = source, "push_weights"
    original = getattr(timed, attribute)

    def timed_push(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            push_seconds[0] += time.perf_counter() - start

    setattr(timed, attribute, timed_push)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends, self.pushes = [], []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            self.pushes.append(push_seconds[0])

    times = StepTimes()
    trainer.add_callback(times)
    start = time.perf_counter()
    trainer.train()
    trainer.end()
    ends = [start, *times.ends]
    step_s = [b - a for a, b in itertools.pairwise(ends)][args.warmup :]
    pushes = [b - a for a, b in itertools.pairwise([0.0, *times.pushes])][args.warmup :]
    tokens = args.batch_size * args.gradient_accumulation_steps * args.new_tokens
    median = statistics.median(step_s)
    return {
        "step_s": median,
        "tokens_per_s": tokens / median,
        "push_s_per_step": statistics.median(pushes),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "steps_s": step_s,
    }


def main(argv=None):
    args = parse_args(argv)
    if os.cpu_count() < 2:
        raise SystemExit("needs 2 cores: one for the student's server, one for the trainer")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from bench_rollouts import build_models, machine_name
    from datasets import Dataset

    from trl_eopd.tiny import toy_arithmetic_conversations

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer, paths = build_models(args, workdir)
        rows = args.batch_size * args.gradient_accumulation_steps * (args.warmup + args.repeats + 2)
        dataset = Dataset.from_list(toy_arithmetic_conversations(rows, seed=args.seed))
        # Each run in a process of its own would cost a model build each; in one process, the peak memory is the
        # largest so far, so the colocated engine (the largest) runs last.
        order = [name for name in ("server", "async", "colocate") if name in args.runs]
        server = url = None
        try:
            for name in order:
                if name == "colocate":
                    if server is not None:
                        stop_server(server)
                        server = None
                    os.sched_setaffinity(0, {0, 1})
                    torch.set_num_threads(2)
                else:
                    if server is None:
                        server, url = start_server(paths["student"], workdir, core=0)
                    os.sched_setaffinity(0, {1})
                    torch.set_num_threads(1)
                results[name] = run(name, args, tokenizer, paths, dataset, workdir, url)
                r = results[name]
                print(f"{name}: step {r['step_s']:.2f} s, {r['tokens_per_s']:.0f} tokens/s", flush=True)
        finally:
            if server is not None:
                stop_server(server)

    print(f"\nMachine: {machine_name()}; torch {torch.__version__}")
    print(f"Models: {args.num_layers} layers, hidden {args.hidden_size}, head size {args.head_dim}, vocabulary "
          f"{args.vocab_size}; {args.batch_size} x {args.gradient_accumulation_steps} completions of "
          f"{args.new_tokens} tokens per step; median of {args.repeats} steps after {args.warmup}")  # fmt: skip
    print("\n| run | step (s) | tokens/s | weight push per step (s) | trainer peak RSS (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for name in order:
        r = results[name]
        print(f"| {name} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['push_s_per_step']:.3f} | "
              f"{r['peak_rss_gib']:.2f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine_name(), "results": results}, f, indent=2)
    sync = [results[name]["step_s"] for name in ("colocate", "server") if name in results]
    if "async" in results and sync:
        print(f"async step / sync step = {results['async']['step_s'] / min(sync):.2f}x")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
