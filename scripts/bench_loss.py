"""Peak memory and wall time of the distillation loss stage, forward and backward.

The stage starts from both models' last hidden states `(B, L, H)` and the two `lm_head` weights, and ends when the
student's gradients exist; the output projections are part of it. Three variants:

- `gkd`: TRL's GKDTrainer way: project every position of both models to full logits, then
  `GKDTrainer.generalized_jsd_loss(..., beta=1)` with the labels' mask.
- `eopd_full`: `trl_eopd.eopd_loss` on the same full logits (the mask is applied inside).
- `eopd_chunked`: select the completion positions first, then `chunked_eopd_loss_and_stats`.

Every run of every variant is a fresh subprocess on identical seeded inputs, and the repeats are interleaved across
variants. Memory is the peak above the level reached after setup: on CUDA from the allocator's counters, on CPU from the
kernel's resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs` before each run; a psutil sampling
thread is the fallback).

Example:
    python scripts/bench_loss.py --repeats 3 --json bench_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

VARIANTS = ("gkd", "eopd_full", "eopd_chunked")
_HWM_RESET_WORKS = None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--prompt-fraction", type=float, default=0.5, help="Leading share of each sequence with no loss."
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="Defaults to 32768 on CPU, 151936 (Qwen3) on CUDA."
    )
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--teacher-hidden-size", type=int, default=None, help="Defaults to --hidden-size.")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda'.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="Untimed runs before the timed one, in each subprocess.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Write the results to this path.")
    parser.add_argument("--worker", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return args


def resolve(args):
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.vocab_size is None:
        args.vocab_size = 151936 if args.device.startswith("cuda") else 32768
    if args.teacher_hidden_size is None:
        args.teacher_hidden_size = args.hidden_size
    return args


def machine_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


class CpuPeak:
    """Peak resident memory above the level at `__enter__`, in bytes."""

    def __enter__(self):
        global _HWM_RESET_WORKS
        self.start = _rss_kib("VmRSS")
        if _HWM_RESET_WORKS is not False:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                _HWM_RESET_WORKS = _rss_kib("VmHWM") <= self.start + 1024
            except OSError:
                _HWM_RESET_WORKS = False
        self.sampled = self.start
        self._stop = threading.Event()
        if not _HWM_RESET_WORKS:
            import psutil

            process = psutil.Process()

            def sample():
                while not self._stop.is_set():
                    self.sampled = max(self.sampled, process.memory_info().rss // 1024)
                    time.sleep(0.0005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        peak = _rss_kib("VmHWM") if _HWM_RESET_WORKS else self.sampled
        if not _HWM_RESET_WORKS:
            self._thread.join()
        self.peak_bytes = max(peak - self.start, 0) * 1024


class CudaPeak:
    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.start


# ---------------------------------------------------------------------------------------------------------- worker


def run_worker(script: str, forwarded: list[str], name: str, env: dict) -> dict:
    """Run `script --worker name` in a fresh process (so its peak memory is its own) and return its JSON line."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), *forwarded, "--worker", name],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_inputs(args):
    import torch

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    b, length, v = args.batch_size, args.seq_len, args.vocab_size

    def randn(*shape, scale):
        # Built on the CPU from one seeded generator so that every variant and device sees the same numbers.
        return (torch.randn(*shape, generator=generator) * scale).to(device=args.device, dtype=dtype)

    student_hidden = randn(b, length, args.hidden_size, scale=1.0).requires_grad_(True)
    student_weight = randn(v, args.hidden_size, scale=args.hidden_size**-0.5).requires_grad_(True)
    teacher_hidden = randn(b, length, args.teacher_hidden_size, scale=1.0)
    teacher_weight = randn(v, args.teacher_hidden_size, scale=2.0 * args.teacher_hidden_size**-0.5)
    labels = torch.randint(0, v, (b, length), generator=generator)
    labels[:, : round(args.prompt_fraction * length)] = -100
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels.to(args.device)


def run_variant(name, args, inputs):
    import torch

    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs
    if name == "gkd":
        from trl.experimental.gkd import GKDTrainer

        student_logits = student_hidden @ student_weight.t()
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
        loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=1.0)
    elif name == "eopd_full":
        from trl_eopd import eopd_loss

        student_logits = student_hidden @ student_weight.t()
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
        loss = eopd_loss(student_logits, teacher_logits, labels)
    else:
        from trl_eopd.loss import chunked_eopd_loss_and_stats

        mask = labels != -100
        loss, _ = chunked_eopd_loss_and_stats(
            student_hidden[mask], student_weight, teacher_hidden[mask], teacher_weight, labels[mask],
            chunk_size=args.chunk_size,
        )  # fmt: skip
    loss.backward()
    return float(loss)


def worker(args):
    import torch

    torch.manual_seed(args.seed)
    inputs = make_inputs(args)
    cuda = args.device.startswith("cuda")
    peak_cls = CudaPeak if cuda else CpuPeak
    times, peaks, losses = [], [], []
    for i in range(args.warmup + args.repeats):
        for t in inputs[:2]:
            t.grad = None
        with peak_cls() as peak:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses.append(run_variant(args.worker, args, inputs))
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
            peaks.append(peak.peak_bytes)
    print(json.dumps({"variant": args.worker, "times": times, "peaks": peaks, "loss": losses[-1]}))


# ---------------------------------------------------------------------------------------------------------- driver


def main(argv=None):
    args = resolve(parse_args(argv))
    if args.worker is not None:
        worker(args)
        return

    forwarded = [
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--prompt-fraction", str(args.prompt_fraction), "--vocab-size", str(args.vocab_size),
        "--hidden-size", str(args.hidden_size), "--teacher-hidden-size", str(args.teacher_hidden_size),
        "--device", args.device, "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
        "--repeats", "1", "--warmup", str(args.warmup), "--seed", str(args.seed),
    ]  # fmt: skip
    # glibc raises its mmap threshold (up to 32 MiB) after the first large free and then keeps freed blocks resident,
    # which would hide later peaks from the RSS counters. A fixed threshold makes every large tensor an mmap that goes
    # back to the kernel on free, so RSS tracks live tensors in every variant alike.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
    results = {}
    # Repeats are interleaved across variants, each in a fresh process, so that a noisy neighbour slows every variant
    # alike instead of whichever happened to run at the time.
    for _ in range(args.repeats):
        for variant in args.variants:
            run = run_worker(__file__, forwarded, variant, env)
            result = results.setdefault(variant, {"variant": variant, "times": [], "peaks": []})
            result["times"] += run["times"]
            result["peaks"] += run["peaks"]
            result["loss"] = run["loss"]

    machine = machine_name(args.device)
    num_loss_tokens = args.batch_size * (args.seq_len - round(args.prompt_fraction * args.seq_len))
    print(f"machine: {machine}")
    print(
        f"B={args.batch_size} L={args.seq_len} loss tokens={num_loss_tokens} V={args.vocab_size} "
        f"H={args.hidden_size}/{args.teacher_hidden_size} dtype={args.dtype} device={args.device} "
        f"chunk={args.chunk_size} repeats={args.repeats} (interleaved, fresh process each, +{args.warmup} warmup), "
        "forward+backward"
    )
    reference = results.get("gkd")
    ref_time = statistics.median(reference["times"]) if reference else None
    ref_peak = statistics.median(reference["peaks"]) if reference else None
    header = f"{'variant':<14} {'time (s)':>9} {'peak (MiB)':>11} {'time/gkd':>9} {'mem/gkd':>8} {'loss':>12}"
    print(header)
    print("-" * len(header))
    rows = []
    for variant, result in results.items():
        t, m = statistics.median(result["times"]), statistics.median(result["peaks"])
        time_ratio = t / ref_time if ref_time else float("nan")
        mem_ratio = m / ref_peak if ref_peak else float("nan")
        print(
            f"{variant:<14} {t:>9.3f} {m / 2**20:>11.1f} {time_ratio:>9.3f} {mem_ratio:>8.3f} {result['loss']:>12.6f}"
        )
        rows.append({**result, "median_time_s": t, "median_peak_bytes": m, "time_ratio": time_ratio,
                     "memory_ratio": mem_ratio})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
