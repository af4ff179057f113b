"""Whole on-policy EOPD steps with the teacher in the trainer process and with the teacher served by vLLM.

Two trainer processes train the same student (the `scripts/bench_rollouts.py` models: random weights, built locally)
on the same prompts with the paper's loss (sampled reverse KL, top-16 forward KL, gate at 0.8 nats): one holds the
teacher, the other fetches the teacher's top log-probabilities from a vLLM server on 127.0.0.1 hosting the same
teacher (started here, with the vLLM environment's Python, and stopped at the end). The trainers need no vLLM.
Completions are forced to `--new-tokens` tokens so both sample the same number of tokens. Their steps are interleaved
(one step of each per round, the order alternating), so a busy machine slows both alike. A step is one micro-batch:
the rollout with `generate`, the teacher (forward pass or request), the student's forward and backward passes and the
optimizer step. Printed: the median step of each, their ratio, the request's share of the served step, and each
trainer process's peak resident memory (and the server's).

    PYTHONPATH=. python scripts/bench_teacher_server.py --repeats 5
    TRL_EOPD_VLLM_PYTHON=.venv-vllm/bin/python PYTHONPATH=. python scripts/bench_teacher_server.py --json out.json

The server shares the machine's cores with the trainers here; on a real node it has its own GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "vllm_engine"))

MODES = ("local", "served")


def parse_args(argv=None):
    from bench_rollouts import add_workload_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--top-logprobs", type=int, default=None, help="Fetch count (default: EOPDConfig's).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds (one step of each trainer per round).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each trainer.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    # Internal: one trainer process.
    parser.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    """Build one trainer and run a step per `step` line on stdin, answering one JSON line each."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from bench_rollouts import Timer, _checked_generate, one_step
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer
    from trl_eopd.tiny import toy_arithmetic_conversations

    torch.set_num_threads(args.threads)
    paths = {role: os.path.join(args.workdir, role) for role in ("student", "teacher")}
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    rounds = args.warmup + args.repeats
    dataset = Dataset.from_list(toy_arithmetic_conversations(args.batch_size * rounds, seed=args.seed))
    options = dict(
        output_dir=os.path.join(args.workdir, args.worker), per_device_train_batch_size=args.batch_size,
        max_new_tokens=args.new_tokens, learning_rate=1e-5, bf16=False, report_to="none", save_strategy="no",
        seed=args.seed, max_length=256, reverse_kl_estimator="sampled", forward_kl_top_k=16, use_cpu=True,
    )  # fmt: skip
    if args.worker == "served":
        options.update(teacher_model_server_url=args.url, teacher_model_server_timeout=600)
        if args.top_logprobs:
            options["teacher_top_logprobs"] = args.top_logprobs
        teacher = None
    else:
        teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    trainer = EOPDTrainer(model=student, teacher_model=teacher, args=EOPDConfig(**options), train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    rollout_timer, request_timer = Timer(), Timer()
    trainer.generation_config.min_new_tokens = args.new_tokens
    trainer.generate_on_policy_outputs = rollout_timer.wrap(
        _checked_generate(trainer.generate_on_policy_outputs, args.new_tokens)
    )
    if trainer._teacher_server is not None:
        trainer._teacher_server.fetch = request_timer.wrap(trainer._teacher_server.fetch)
    trainer.create_optimizer_and_scheduler(num_training_steps=rounds + 1)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        index = command["round"]
        rows = [dataset[i] for i in range(index * args.batch_size, (index + 1) * args.batch_size)]
        request_timer.seconds = 0.0
        step, rollout = one_step(trainer, rollout_timer, rows)
        print(json.dumps({"step": step, "rollout": rollout, "request": request_timer.seconds}), flush=True)
    print(json.dumps({"peak_rss_mib": _peak_rss_mib()}), flush=True)


class _Worker:
    def __init__(self, mode, args, workdir, url):
        command = [sys.executable, __file__, "--worker", mode, "--workdir", workdir, "--url", url or "",
                   "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--seed", str(args.seed)]  # fmt: skip
        if args.top_logprobs:
            command += ["--top-logprobs", str(args.top_logprobs)]
        python_path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path, "TRL_EXPERIMENTAL_SILENCE": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.mode = mode

    def receive(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.mode} trainer exited with {self.process.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()


def _server_peak_rss_mib(server) -> float:
    """VmHWM summed over the server's process group (the API process and its engine process)."""
    total = 0
    group = os.getpgid(server.process.pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch
    import transformers
    from bench_rollouts import build_models, machine_name
    from served_teacher import TeacherServerProcess

    with tempfile.TemporaryDirectory() as workdir:
        _, paths = build_models(args, workdir)
        server = TeacherServerProcess(paths["teacher"], max_model_len=512, log_dir=workdir)
        server.start()
        try:
            workers = {mode: _Worker(mode, args, workdir, server.url) for mode in MODES}
            for w in workers.values():
                w.receive()
            times = {mode: [] for mode in MODES}
            for index in range(args.warmup + args.repeats):
                order = MODES if index % 2 == 0 else MODES[::-1]
                for mode in order:
                    workers[mode].send(op="step", round=index)
                    result = workers[mode].receive()
                    label = "warmup" if index < args.warmup else "timed"
                    print(f"[{label} {index}] {mode:6s} step {result['step']:7.2f} s   rollout "
                          f"{result['rollout']:6.2f} s   request {result['request']:6.2f} s", flush=True)  # fmt: skip
                    if index >= args.warmup:
                        times[mode].append(result)
            peaks = {}
            for mode, w in workers.items():
                w.send(op="quit")
                peaks[mode] = w.receive()["peak_rss_mib"]
                w.process.wait(timeout=60)
            server_peak = _server_peak_rss_mib(server)
        finally:
            server.stop()

    results = {
        mode: {
            "step_s": statistics.median(r["step"] for r in times[mode]),
            "request_share": sum(r["request"] for r in times[mode]) / sum(r["step"] for r in times[mode]),
            "rollout_share": sum(r["rollout"] for r in times[mode]) / sum(r["step"] for r in times[mode]),
            # Everything but the rollout: the part of the step the teacher's placement can change.
            "rest_s": statistics.median(r["step"] - r["rollout"] for r in times[mode]),
            "peak_rss_mib": peaks[mode],
            "steps_s": [r["step"] for r in times[mode]],
        }
        for mode in MODES
    }
    ratios = [
        served / local for served, local in zip(results["served"]["steps_s"], results["local"]["steps_s"], strict=True)
    ]
    rest_ratios = [
        (served["step"] - served["rollout"]) / (local["step"] - local["rollout"])
        for served, local in zip(times["served"], times["local"], strict=True)
    ]
    print(f"\nMachine: {machine_name()}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.threads} thread(s) per trainer; the vLLM server on the same cores")  # fmt: skip
    print(f"Models: {args.num_layers} layers, hidden {args.hidden_size}, head size {args.head_dim}, vocabulary "
          f"{args.vocab_size}; batch {args.batch_size}, {args.new_tokens} new tokens forced; median of "
          f"{args.repeats} interleaved rounds after {args.warmup} warm-up round(s)")  # fmt: skip
    print(
        "\n| teacher | step (s) | step without rollout (s) | rollout share | request share | trainer peak RSS (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        r = results[mode]
        request = f"{100 * r['request_share']:.1f}%" if mode == "served" else "-"
        print(f"| {mode} | {r['step_s']:.2f} | {r['rest_s']:.2f} | {100 * r['rollout_share']:.0f}% | {request} "
              f"| {r['peak_rss_mib']:.0f} |")  # fmt: skip
    print(f"\nServed / local step: {statistics.median(ratios):.3f}x; without the rollouts (the same `generate` in "
          f"both): {statistics.median(rest_ratios):.3f}x (medians of per-round ratios); vLLM server peak RSS "
          f"{server_peak:.0f} MiB")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine_name(), "results": results, "ratio": ratios,
                       "ratio_without_rollout": rest_ratios,
                       "server_peak_rss_mib": server_peak}, f, indent=2)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
