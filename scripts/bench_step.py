"""Whole training steps of `EOPDTrainer` against TRL's `GKDTrainer(beta=1)`: wall time and peak memory.

Both trainers train the same tiny, vocabulary-dominated Qwen3 student against the same teacher (built locally, no
downloads) on the same fixed-length chat data, with the same batch and seed. Generation is switched off (`lmbda=0.0`,
`seq_kd=False`), so both train on the dataset's completions and only the loss path differs: GKD builds full
`(batch, seq, vocab)` logits for both models, EOPD (with `memory_efficient_loss`) projects the completion tokens a chunk
at a time. Each trainer runs in its own fresh subprocess. A step is timed from `on_step_begin` to `on_step_end` (forward,
backward and optimizer step); memory is the step's peak above the level at its start (CUDA allocator counters on GPU,
`VmHWM` reset through `/proc/self/clear_refs` on CPU). The first steps, which allocate the optimizer state, are warmup.

Example:
    python scripts/bench_step.py --steps 4 --warmup 1 --json bench_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import CpuPeak, CudaPeak, machine_name, run_worker

TRAINERS = ("gkd", "eopd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--teacher-hidden-size", type=int, default=None, help="Defaults to --hidden-size.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="Approximate tokens per example, prompt included.")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first (optimizer state allocation).")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present) or 'cpu'.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Write the results to this path.")
    parser.add_argument("--worker", default=None, choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_setup(args, workdir):
    """Save a tokenizer, a student, a teacher and a fixed-length chat dataset under `workdir`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trl_eopd.tiny import build_tiny_tokenizer, toy_arithmetic_conversations

    tokenizer = build_tiny_tokenizer()

    def model(hidden_size, seed):
        config = Qwen3Config(
            # The head is much wider than the tokenizer, as padded vocabularies are; it is what makes logits dominate.
            vocab_size=args.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            max_position_embeddings=4 * args.seq_len,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)

    for role, hidden_size, seed in (("student", args.hidden_size, args.seed),
                                    ("teacher", args.teacher_hidden_size, args.seed + 1)):  # fmt: skip
        model(hidden_size, seed).save_pretrained(os.path.join(workdir, role))
        tokenizer.save_pretrained(os.path.join(workdir, role))

    # Each example packs word problems until prompt and completion are about half of --seq-len each, so that every
    # batch has the same shape and both trainers see the same token count.
    problems = toy_arithmetic_conversations(4096, seed=args.seed)
    rows, cursor = [], 0
    for _ in range(args.batch_size * (args.warmup + args.steps)):
        questions, answers = [], []
        while len(tokenizer(" ".join(questions)).input_ids) < args.seq_len // 2 - 8:
            questions.append(problems[cursor % len(problems)]["messages"][0]["content"])
            answers.append(problems[cursor % len(problems)]["messages"][1]["content"])
            cursor += 1
        rows.append({"messages": [{"role": "user", "content": " ".join(questions)},
                                  {"role": "assistant", "content": " ".join(answers)}]})  # fmt: skip
    with open(os.path.join(workdir, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def worker(args):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    cuda = args.device.startswith("cuda")
    peak_cls = CudaPeak if cuda else CpuPeak
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.workdir, "student"))
    student = AutoModelForCausalLM.from_pretrained(os.path.join(args.workdir, "student"))
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(args.workdir, "teacher"))
    dataset = load_dataset("json", data_files=os.path.join(args.workdir, "train.jsonl"), split="train")
    common = {
        "output_dir": os.path.join(args.workdir, f"out-{args.worker}"),
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.warmup + args.steps,
        "max_length": 2 * args.seq_len,
        "lmbda": 0.0,
        "seq_kd": False,
        "beta": 1.0,
        "learning_rate": 1e-5,
        "bf16": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10**6,
        "seed": args.seed,
        "dataloader_num_workers": 0,
        "use_cpu": not cuda,
    }
    if args.worker == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer_cls, config = GKDTrainer, GKDConfig(**common)
    else:
        from trl_eopd import EOPDConfig, EOPDTrainer

        trainer_cls, config = EOPDTrainer, EOPDConfig(**common, loss_chunk_size=args.chunk_size)

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.times, self.peaks, self.tokens = [], [], []

        def on_step_begin(self, *_, **__):
            self.peak = peak_cls().__enter__()
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            self.peak.__exit__(None, None, None)
            self.peaks.append(self.peak.peak_bytes)

    meter = StepMeter()
    trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[meter])  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    print(json.dumps({
        "trainer": args.worker,
        "times": meter.times[args.warmup:],
        "peaks": meter.peaks[args.warmup:],
        "batch_shape": list(batch["input_ids"].shape),
        "loss_tokens": int((batch["labels"] != -100).sum()),
        "memory_efficient": bool(getattr(trainer, "_memory_efficient", False)),
    }))  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.teacher_hidden_size is None:
        args.teacher_hidden_size = args.hidden_size
    if args.worker is not None:
        worker(args)
        return

    # Same fixed allocator behaviour as bench_loss.py, so that CPU peaks are comparable between processes.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        build_setup(args, workdir)
        forwarded = [
            "--vocab-size", str(args.vocab_size), "--hidden-size", str(args.hidden_size),
            "--num-layers", str(args.num_layers), "--teacher-hidden-size", str(args.teacher_hidden_size),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--chunk-size", str(args.chunk_size), "--device", args.device,
            "--seed", str(args.seed), "--workdir", workdir,
        ]  # fmt: skip
        for name in TRAINERS:
            results[name] = run_worker(__file__, forwarded, name, env)

    machine = machine_name(args.device)
    gkd = results["gkd"]
    print(f"machine: {machine}")
    print(
        f"student/teacher: Qwen3 hidden {args.hidden_size}/{args.teacher_hidden_size}, {args.num_layers} layers, "
        f"vocab {args.vocab_size}; batch {gkd['batch_shape']} with {gkd['loss_tokens']} loss tokens; "
        f"{args.steps} timed steps (+{args.warmup} warmup); device={args.device}; chunk={args.chunk_size}"
    )
    ref_time, ref_peak = statistics.median(gkd["times"]), statistics.median(gkd["peaks"])
    header = f"{'trainer':<8} {'step time (s)':>14} {'peak (MiB)':>11} {'time/gkd':>9} {'mem/gkd':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, result in results.items():
        t, m = statistics.median(result["times"]), statistics.median(result["peaks"])
        print(f"{name:<8} {t:>14.3f} {m / 2**20:>11.1f} {t / ref_time:>9.3f} {m / ref_peak:>8.3f}")
        rows.append({**result, "median_time_s": t, "median_peak_bytes": m, "time_ratio": t / ref_time,
                     "memory_ratio": m / ref_peak})  # fmt: skip
    if not results["eopd"]["memory_efficient"]:
        print("warning: EOPDTrainer fell back to its full-logits path; the comparison is not of the chunked loss.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
