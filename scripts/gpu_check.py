"""One prepared GPU check: the chunked loss's accuracy, the loss stage's speed and memory, and whole training steps.

Sections (each writes into `<out>/gpu_check.json` as soon as it ends, so a run cut short still reports what it did):

1. `correctness`: `chunked_eopd_loss_and_stats` (value, gradients of the student's hidden states and weight, and the
   entropy/KL statistics) against an independent float64 implementation written in this file, for float32 and
   bfloat16 inputs, every gate x base estimator (analytic beta 1 / 0.5 / 0, sampled) x forward-KL top-k (full, 16),
   plus one case with bias, logit scale, softcap and temperature. Fresh random inputs per case.
2. `loss_stage`: projection + loss + backward from hidden states, timed (warm-up, then the median of repeats) with the
   peak memory above the inputs' level, for GKD's full-logits `generalized_jsd_loss`, `trl_eopd.eopd_loss` on full
   logits, the chunked EOPD loss (gate and statistics included) and TRL's `ChunkedDivergenceFunction` (reverse KL, what
   `DistillationTrainer` computes). An out-of-memory error is reported as `"oom"`.
3. `training_steps`: `EOPDTrainer`, TRL's `DistillationTrainer` and `GKDTrainer`, all rolling out with HF `generate`,
   random-weight Qwen3-shaped models, the same prompts, every completion forced to the same length, one step of each
   per round (interleaved). Step time (rollout included), rollout time, completion tokens per second, peak memory.
4. `targets`: the chunked EOPD loss in at most the time of `ChunkedDivergenceFunction` at no more peak memory, and the
   `EOPDTrainer` step at >= 1.2x `DistillationTrainer`'s tokens per second. When a target is missed, `torch.profiler`
   tables of where the time goes are written next to the JSON (`profile_loss.txt`, `profile_step.txt`).

5. `fsdp2`: `EOPDTrainer.training_step` (chunked loss, local teacher, dataset completions) with the student and the
   teacher sharded by FSDP2's `fully_shard` as `recipes/accelerate/fsdp2.yaml` has accelerate shard them, in a
   process group of one (every parameter is still a DTensor, and the teacher's output head is resharded when the loss
   reads it), against the same models unsharded: the loss, every gradient (the output head's included) and one AdamW
   step's update, float32, to 1e-5 relative. Several processes are checked on CPU by tests/test_fsdp2.py.

The run exits 1 when a correctness case or the FSDP2 comparison fails, or a section raises.

Presets:

- `--preset tiny --device cpu`: the same code paths at small shapes, in well under a minute (it runs in the test suite:
  tests/test_gpu_check.py).
- `--preset h200`: student hidden 2048 (Qwen3-1.7B), teacher hidden 4096 (Qwen3-8B), vocabulary 151,936, bf16. The loss
  stage uses one micro-batch of recipes/qwen3-1.7b-math-eopd.yaml: 4 prompts x 4096 completion tokens (16,384 loss
  tokens; the full-logits losses also project 256 prompt positions per row). The training steps use the real layer
  counts and widths (28 layers / 36 layers) with batch 8 and 256 forced new tokens, so that the rollout, which HF
  `generate` runs one token at a time, fits the device budget.

Running it on the lent H200 (the device tool's `run`; the machine's image has torch, transformers, accelerate, peft
and triton but no trl or datasets). Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

`import trl` imports `datasets`, which needs `dill` and `multiprocess`; everything else they need (pyarrow, pandas,
xxhash, fsspec, huggingface-hub, accelerate, psutil, jinja2) is in the image. The four wheels are 1.8 MiB together,
far under the 64 MiB a call may carry. Then one call:

    run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
                 --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
                 python3 -m pip show pyarrow transformers | grep -E '^(Name|Version)';
                 PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1 python3 scripts/gpu_check.py --preset h200
                 --out $OUT 2>&1 | tee $OUT/log.txt",
        carry=[".whl"], timeout_s=540)

(one line in the call). `--budget-s` (default 420 on h200) skips what is left once that much wall time has passed, so
the JSON comes back well inside `timeout_s`; a rerun fits in the 15 device minutes only if the first one ends early.

Wall time on the H200, estimated from the shapes' FLOPs at the measured ~790 TFLOP/s bf16 and ~4.3 TB/s, and from the
tiny preset's per-section overheads (imports and trainer construction ~20 s on this repository's CPU machine):

- start-up: wheel install ~10 s, imports ~20 s;
- correctness: 34 cases at 256 tokens x 151,936; the float64 reference's matmuls are 2 x 256 x 151,936 x 6,144 =
  0.48 TFLOP per case at the FP64 rate (~60 TFLOP/s) plus its (256, 151,936) float64 elementwise passes: ~0.1 s per
  case, ~10 s with compilation and allocation;
- loss stage: the chunked loss is ~5e13 FLOP (both projections, the student's two gradient products) plus ~30 passes
  over (16,384 x 151,936) float32 values (~0.3 TB): ~0.15 s, TRL's kernel ~0.15 s (it projects twice), the full-logits
  losses several passes over 2 x 5.3 GB of logits and their float32 copies: ~1-3 s each or OOM; with warm-up and 3
  repeats, ~30 s;
- training steps: building a 1.7B student (three copies) and an 8B teacher on the GPU ~30 s; one step is dominated by
  256 sequential `generate` steps of a 28-layer model, ~20-35 ms each in eager mode, so ~5-9 s, 9 steps ~80 s;
- profiles when a target is missed: ~30 s;
- fsdp2: two copies each of a 4-layer student and teacher at the real widths and vocabulary in float32 (~0.5 B and
  ~2.1 B parameters, ~21 GB together), one step of each on 4 short rows: ~20-30 s, most of it building the models.

Total ~4-4.5 minutes, inside the 8-minute budget with room for a slow start.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "tiny": {
        "device": "cpu",
        "budget_s": 300,
        "check": {"tokens": 40, "vocab": 512, "student_hidden": 32, "teacher_hidden": 48, "chunk_size": 16},
        "loss": {
            "batch": 2,
            "prompt": 16,
            "completion": 128,
            "vocab": 4096,
            "student_hidden": 64,
            "teacher_hidden": 96,
            "warmup": 1,
            "repeats": 3,
        },
        "student": {
            "layers": 2,
            "hidden": 64,
            "intermediate": 128,
            "heads": 4,
            "kv_heads": 2,
            "head_dim": 16,
            "tie": True,
        },
        "teacher": {
            "layers": 2,
            "hidden": 96,
            "intermediate": 192,
            "heads": 4,
            "kv_heads": 2,
            "head_dim": 24,
            "tie": False,
        },
        "steps": {"vocab": 4096, "batch": 2, "new_tokens": 8, "warmup": 1, "repeats": 2},
        "fsdp2": {"vocab": 4096, "batch": 2, "student_layers": 2, "teacher_layers": 2, "chunk_size": 16},
    },
    "h200": {
        "device": "cuda",
        "budget_s": 420,
        "check": {"tokens": 256, "vocab": 151936, "student_hidden": 2048, "teacher_hidden": 4096, "chunk_size": 64},
        "loss": {
            "batch": 4,
            "prompt": 256,
            "completion": 4096,
            "vocab": 151936,
            "student_hidden": 2048,
            "teacher_hidden": 4096,
            "warmup": 1,
            "repeats": 3,
        },
        # Qwen3-1.7B and Qwen3-8B (their config.json files): widths, depths, heads, tied embeddings on the 1.7B only.
        "student": {
            "layers": 28,
            "hidden": 2048,
            "intermediate": 6144,
            "heads": 16,
            "kv_heads": 8,
            "head_dim": 128,
            "tie": True,
        },
        "teacher": {
            "layers": 36,
            "hidden": 4096,
            "intermediate": 12288,
            "heads": 32,
            "kv_heads": 8,
            "head_dim": 128,
            "tie": False,
        },
        "steps": {"vocab": 151936, "batch": 8, "new_tokens": 256, "warmup": 1, "repeats": 2},
        # Real widths and vocabulary, 4 layers each: the sharded output heads are the full-size ones.
        "fsdp2": {"vocab": 151936, "batch": 4, "student_layers": 4, "teacher_layers": 4, "chunk_size": 1024},
    },
}

# Relative errors allowed against the float64 reference (see `tolerances` for why).
TOLERANCES = {
    "float32": {"loss": 1e-4, "grad": 1e-4, "stats": 1e-4},
    "bfloat16": {"loss": 1e-3, "grad": 2e-2, "stats": 1e-3},
}
# FSDP2 against the unsharded models, both float32 (section `fsdp2`): the same arithmetic on weights held differently.
FSDP2_RTOL = 1e-5
TOLERANCE_REASONS = {
    "float32": "float32 arithmetic: log-sum-exp over the vocabulary and the chunked sums differ from float64 in the "
    "last bits only (~1e-6 relative on a CPU); 1e-4 leaves room for longer sums and cancellation in small KL values "
    "on a GPU, and still catches a 0.1% error.",
    "bfloat16": "the reference is float64 math on the model's own bf16 logits (F.linear in bf16, as the lm_head "
    "computes them). The chunked loss computes everything after the projection in float32, so the value and the "
    "statistics keep float32-level error plus rare one-ulp logit differences between a chunk's and the whole "
    "matrix's matmul (1e-3). Its gradients are pushed through the projection in bf16 (the logit gradient is "
    "rounded to bf16, unit roundoff 2^-8 = 3.9e-3, and each chunk's weight-gradient product is rounded once more "
    "before the float32 sum), so a few units of bf16 roundoff: 2e-2.",
}


# ---------------------------------------------------------------------------------------------- the code under test


def chunked_loss_module():
    """The module of `chunked_eopd_loss_and_stats`, the one place that names its path (it is moving into `loss/`)."""
    try:
        return importlib.import_module("trl_eopd.loss.chunked")
    except ModuleNotFoundError:
        return importlib.import_module("trl_eopd.chunked_loss")


def chunked_eopd_loss_and_stats(*args, **kwargs):
    return chunked_loss_module().chunked_eopd_loss_and_stats(*args, **kwargs)


# ------------------------------------------------------------------------------------------------- helpers


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory above the level at `__enter__`: the CUDA allocator's counters, or resident memory on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            from bench_loss import CpuPeak

            self._cpu = CpuPeak().__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self._cpu.__exit__(*exc)
            self.bytes = self._cpu.peak_bytes


def free_memory(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def versions(device) -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu": _cpu_name(),
    }
    for name in ("trl", "accelerate", "triton", "datasets"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001 - a missing package is a fact to report, not a failure here
            info[name] = f"unavailable ({type(error).__name__}: {error})"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def timed_runs(function, device, warmup: int, repeats: int) -> dict:
    """Warm-up calls, then `repeats` timed calls; the peak memory is the largest over the timed calls."""
    for _ in range(warmup):
        function()
    times, peaks = [], []
    for _ in range(repeats):
        with Peak(device) as peak:
            start = time.perf_counter()
            function()
            synchronize(device)
            times.append(time.perf_counter() - start)
        peaks.append(peak.bytes)
    return {"status": "ok", "median_s": statistics.median(times), "times_s": times, "peak_mib": max(peaks) / 2**20}


# ------------------------------------------------------------------------------------- float64 reference (independent)


def reference_from_logits(student_logits, teacher_logits, targets, *, entropy_threshold, forward_kl_coef, gate, beta,
                          temperature, forward_kl_top_k, reverse_kl_estimator):  # fmt: skip
    """The EOPD loss of arXiv 2603.07079 in float64, on `(N, V)` float64 logits (tempered here); returns
    `(loss, per_token_loss, stats)`. Written from the formula, sharing no code with `trl_eopd`."""
    import torch

    z_s = student_logits / temperature
    z_t = teacher_logits / temperature
    log_q = z_s - torch.logsumexp(z_s, dim=-1, keepdim=True)
    log_p = z_t - torch.logsumexp(z_t, dim=-1, keepdim=True)
    q, p = log_q.exp(), log_p.exp()
    teacher_entropy = -(p * log_p).sum(-1)
    gated = (teacher_entropy > entropy_threshold).double().detach()
    reverse_kl = (q * (log_q - log_p)).sum(-1)
    forward_kl = (p * (log_p - log_q)).sum(-1)
    if reverse_kl_estimator == "sampled":
        ids = targets.unsqueeze(-1)
        k = (log_q.gather(-1, ids) - log_p.gather(-1, ids)).squeeze(-1)
        # value k, gradient k * grad log q(y): the policy-gradient surrogate
        sampled_log_q = log_q.gather(-1, ids).squeeze(-1)
        base = k.detach() + k.detach() * (sampled_log_q - sampled_log_q.detach())
    elif beta == 1.0:
        base = reverse_kl
    elif beta == 0.0:
        base = forward_kl
    else:
        m = beta * p + (1.0 - beta) * q
        log_m = m.log()
        base = beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
    if forward_kl_top_k is None:
        forward = forward_kl
    else:
        top_logits, top_ids = z_t.topk(min(forward_kl_top_k, z_t.size(-1)), dim=-1)
        top_p = top_logits.softmax(-1)
        forward = (top_p * (top_p.log() - log_q.gather(-1, top_ids))).sum(-1)
    base_used = base if gate == "augment" else (1.0 - gated) * base
    per_token = base_used + forward_kl_coef * gated * forward
    loss = per_token.sum() / max(per_token.numel(), 1)
    stats = {
        "teacher_entropy": teacher_entropy.sum().item(),
        "reverse_kl": reverse_kl.sum().item(),
        "forward_kl": forward_kl.sum().item(),
        "num_high_entropy": int(gated.sum().item()),
    }
    return loss, per_token.detach(), stats


def reference(inputs, options, head):
    """Float64 loss, statistics and the gradients of the student's hidden states, weight and bias.

    float32 inputs: logits are computed exactly in float64 from the inputs. bfloat16 inputs: logits are the model's own
    bf16 `F.linear` output (what the lm_head returns), upcast; everything after that is float64. The gradient with
    respect to the raw projection comes from autograd in float64 and is pushed through the projection in float64.
    """
    import torch
    import torch.nn.functional as F

    def raw_logits(hidden, weight, bias):
        if hidden.dtype == torch.bfloat16:
            return F.linear(hidden, weight, bias).double()
        raw = hidden.double() @ weight.double().t()
        return raw if bias is None else raw + bias.double()

    def finish(raw, scale, softcap):
        z = raw * scale
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    with torch.no_grad():
        student_raw = raw_logits(inputs["student_hidden"], inputs["student_weight"], inputs.get("student_bias"))
        teacher_raw = raw_logits(inputs["teacher_hidden"], inputs["teacher_weight"], inputs.get("teacher_bias"))
    student_raw.requires_grad_(True)
    with torch.enable_grad():
        student_logits = finish(student_raw, head["student_logit_scale"], head["student_softcap"])
        teacher_logits = finish(teacher_raw, head["teacher_logit_scale"], head["teacher_softcap"])
        loss, per_token, stats = reference_from_logits(student_logits, teacher_logits, inputs["targets"], **options)
        (grad_raw,) = torch.autograd.grad(loss, [student_raw])
    result = {
        "loss": loss.item(),
        "loss_scale": per_token.abs().mean().item(),
        "stats": stats,
        "grad_hidden": grad_raw @ inputs["student_weight"].double(),
        "grad_weight": grad_raw.t() @ inputs["student_hidden"].double(),
    }
    if inputs.get("student_bias") is not None:
        result["grad_bias"] = grad_raw.sum(0)
    return result


def teacher_entropies(inputs, head, temperature):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        hidden, weight = inputs["teacher_hidden"], inputs["teacher_weight"]
        bias = inputs.get("teacher_bias")
        if hidden.dtype == torch.bfloat16:
            raw = F.linear(hidden, weight, bias).double()
        else:
            raw = hidden.double() @ weight.double().t() + (0.0 if bias is None else bias.double())
        z = raw * head["teacher_logit_scale"]
        if head["teacher_softcap"] is not None:
            z = head["teacher_softcap"] * torch.tanh(z / head["teacher_softcap"])
        log_p = (z / temperature).log_softmax(-1)
        return -(log_p.exp() * log_p).sum(-1)


def threshold_in_widest_gap(entropies) -> tuple[float, float]:
    """A gate threshold in the widest gap between the middle teacher entropies, and its distance to the nearest one.

    Both gate branches are then taken, and no token sits so close to the threshold that a float32 or bf16 rounding of
    its entropy could flip its gate (which would change its loss by a whole forward-KL term).
    """
    values = sorted(entropies.tolist())
    n = len(values)
    low, high = max(1, n // 5), min(n - 1, (4 * n) // 5)
    gap, index = max((values[i] - values[i - 1], i) for i in range(low, high + 1))
    return (values[index] + values[index - 1]) / 2, gap / 2


# ------------------------------------------------------------------------------------------------- 1. correctness


def correctness_cases():
    cases = []
    for gate in ("augment", "switch"):
        for estimator, beta in (("analytic", 1.0), ("analytic", 0.5), ("analytic", 0.0), ("sampled", 1.0)):
            for top_k in (None, 16):
                cases.append({"gate": gate, "reverse_kl_estimator": estimator, "beta": beta, "forward_kl_top_k": top_k,
                              "temperature": 1.0, "forward_kl_coef": 1.0, "head": "plain"})  # fmt: skip
    # The output-head variants that some models have (Gemma's softcap, Cohere's logit scale, biased heads).
    cases.append({"gate": "augment", "reverse_kl_estimator": "analytic", "beta": 1.0, "forward_kl_top_k": 16,
                  "temperature": 0.7, "forward_kl_coef": 0.5, "head": "bias_scale_softcap"})  # fmt: skip
    return cases


def make_check_inputs(shape, dtype, device, seed, with_bias):
    """Random inputs whose teacher entropies fall into two well-separated groups (see `threshold_in_widest_gap`)."""
    import torch

    # Drawn on the device: a (151936, 4096) weight drawn on the CPU and copied over takes seconds per case.
    generator = torch.Generator(device=device).manual_seed(seed)
    n, v, h_s, h_t = shape["tokens"], shape["vocab"], shape["student_hidden"], shape["teacher_hidden"]

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device)

    # Teacher logits have a per-token standard deviation of about `scale`: small ones give near-uniform, high-entropy
    # teachers; large ones (logits up to ~40, as real models have) give peaked, low-entropy teachers.
    scales = torch.tensor([0.5, 1.5, 6.0, 8.0], device=device)
    teacher_scale = scales[torch.randint(0, 4, (n,), generator=generator, device=device)]
    student_scale = 1.0 + 2.0 * torch.rand(n, generator=generator, device=device)
    inputs = {
        "student_hidden": randn(n, h_s) * student_scale.unsqueeze(-1),
        "student_weight": randn(v, h_s) / math.sqrt(h_s),
        "teacher_hidden": randn(n, h_t) * teacher_scale.unsqueeze(-1),
        "teacher_weight": randn(v, h_t) / math.sqrt(h_t),
    }
    if with_bias:
        inputs["student_bias"] = 0.3 * randn(v)
        inputs["teacher_bias"] = 0.3 * randn(v)
    inputs = {k: t.to(dtype) for k, t in inputs.items()}
    inputs["targets"] = torch.randint(0, v, (n,), generator=generator, device=device)
    return inputs


def relative_error(got, want) -> float:
    import torch

    got, want = got.double(), want.double()
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-300)).item()


def run_correctness(preset, device, record):
    import torch

    shape = preset["check"]
    results, seed = [], 1000
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        tolerance = TOLERANCES[dtype_name]
        for case in correctness_cases():
            seed += 1
            extras = case["head"] == "bias_scale_softcap"
            head = {
                "student_logit_scale": 0.9 if extras else 1.0,
                "teacher_logit_scale": 1.1 if extras else 1.0,
                "student_softcap": 30.0 if extras else None,
                "teacher_softcap": 30.0 if extras else None,
            }
            inputs = make_check_inputs(shape, dtype, device, seed, with_bias=extras)
            threshold, margin = threshold_in_widest_gap(teacher_entropies(inputs, head, case["temperature"]))
            options = {
                "entropy_threshold": threshold,
                "forward_kl_coef": case["forward_kl_coef"],
                "gate": case["gate"],
                "beta": case["beta"],
                "temperature": case["temperature"],
                "forward_kl_top_k": case["forward_kl_top_k"],
                "reverse_kl_estimator": case["reverse_kl_estimator"],
            }
            want = reference(inputs, options, head)

            leaves = {k: inputs[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight")}
            if extras:
                leaves["student_bias"] = inputs["student_bias"].clone().requires_grad_(True)
            loss, stats = chunked_eopd_loss_and_stats(
                leaves["student_hidden"], leaves["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
                inputs["targets"], student_bias=leaves.get("student_bias"), teacher_bias=inputs.get("teacher_bias"),
                chunk_size=shape["chunk_size"], **head, **options,
            )  # fmt: skip
            grads = torch.autograd.grad(loss, list(leaves.values()))
            errors = {
                "loss": abs(loss.item() - want["loss"]) / max(want["loss_scale"], 1e-12),
                "grad_hidden": relative_error(grads[0], want["grad_hidden"]),
                "grad_weight": relative_error(grads[1], want["grad_weight"]),
            }
            if extras:
                errors["grad_bias"] = relative_error(grads[2], want["grad_bias"])
            for name in ("teacher_entropy", "reverse_kl", "forward_kl"):
                errors[f"stats_{name}"] = abs(getattr(stats, name).item() - want["stats"][name]) / max(
                    abs(want["stats"][name]), 1e-12
                )
            finite = math.isfinite(loss.item()) and all(bool(torch.isfinite(g).all()) for g in grads)
            gate_counts_match = int(stats.num_high_entropy) == want["stats"]["num_high_entropy"]
            passed = (
                finite
                and gate_counts_match
                and errors["loss"] <= tolerance["loss"]
                and all(errors[k] <= tolerance["grad"] for k in errors if k.startswith("grad_"))
                and all(errors[k] <= tolerance["stats"] for k in errors if k.startswith("stats_"))
            )
            results.append({
                "dtype": dtype_name, **case, "entropy_threshold": threshold, "gate_margin_nats": margin,
                "num_high_entropy": want["stats"]["num_high_entropy"], "num_tokens": shape["tokens"],
                "errors": errors, "finite": finite, "gate_counts_match": gate_counts_match, "passed": passed,
            })  # fmt: skip
            if not passed:
                print(f"  FAIL {dtype_name} {case}: {errors}", flush=True)
            del inputs, leaves, grads, want
            free_memory(device)
    passed = all(r["passed"] for r in results)
    record["correctness"] = {
        "shape": shape,
        "tolerances": TOLERANCES,
        "tolerance_reasons": TOLERANCE_REASONS,
        "cases": results,
        "passed": passed,
    }
    worst = {d: max(max(r["errors"].values()) for r in results if r["dtype"] == d) for d in TOLERANCES}
    print(f"correctness: {sum(r['passed'] for r in results)}/{len(results)} cases pass; worst relative error "
          f"{worst}", flush=True)  # fmt: skip
    return passed


# ------------------------------------------------------------------------------------------------- 2. loss stage


def eopd_loss_options():
    """The options `EOPDTrainer` passes by default (`EOPDConfig`'s defaults), with the chunk size."""
    from trl_eopd import EOPDConfig

    with tempfile.TemporaryDirectory() as tmp:
        config = EOPDConfig(output_dir=tmp, report_to="none", use_cpu=True)
    options = {
        "entropy_threshold": config.entropy_threshold,
        "forward_kl_coef": config.forward_kl_coef,
        "gate": config.gate,
        "beta": config.beta,
        "temperature": config.temperature,
        "forward_kl_top_k": config.forward_kl_top_k,
        "reverse_kl_estimator": config.reverse_kl_estimator,
    }
    return options, config.loss_chunk_size


def loss_stage_inputs(shape, device, dtype):
    """Hidden states of one micro-batch (prompt and completion positions), the two heads and the labels."""
    import torch

    generator = torch.Generator(device=device).manual_seed(7)
    b, prompt, completion = shape["batch"], shape["prompt"], shape["completion"]
    v, h_s, h_t = shape["vocab"], shape["student_hidden"], shape["teacher_hidden"]
    length = prompt + completion

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    labels = torch.randint(0, v, (b, length), generator=generator, device=device)
    labels[:, :prompt] = -100
    return {
        "student_hidden": randn(b, length, h_s, scale=2.0),
        "teacher_hidden": randn(b, length, h_t, scale=3.0),
        "student_weight": randn(v, h_s, scale=1 / math.sqrt(h_s)).requires_grad_(True),
        "teacher_weight": randn(v, h_t, scale=1 / math.sqrt(h_t)),
        "labels": labels,
    }


def loss_stage_variants(inputs, options, chunk_size):
    """name -> a function running projection + loss + backward, the way each trainer does it."""
    import torch

    mask = inputs["labels"] != -100
    targets = inputs["labels"][mask]
    student_weight, teacher_weight = inputs["student_weight"], inputs["teacher_weight"]
    # The loss positions' hidden states, as the chunked losses take them (the backbone's output there).
    loss_student_hidden = inputs["student_hidden"][mask].detach()
    loss_teacher_hidden = inputs["teacher_hidden"][mask].detach()

    def backward(loss, hidden):
        loss.backward()
        student_weight.grad = None
        hidden.grad = None

    def gkd_full():
        from trl.experimental.gkd import GKDTrainer

        hidden = inputs["student_hidden"].detach().requires_grad_(True)
        student_logits = hidden @ student_weight.t()
        with torch.no_grad():
            teacher_logits = inputs["teacher_hidden"] @ teacher_weight.t()
        loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=inputs["labels"], beta=1.0)
        backward(loss, hidden)

    def eopd_full():
        from trl_eopd import eopd_loss

        hidden = inputs["student_hidden"].detach().requires_grad_(True)
        student_logits = hidden @ student_weight.t()
        with torch.no_grad():
            teacher_logits = inputs["teacher_hidden"] @ teacher_weight.t()
        loss = eopd_loss(student_logits, teacher_logits, inputs["labels"], **options)
        backward(loss, hidden)

    def eopd_chunked():
        hidden = loss_student_hidden.clone().requires_grad_(True)
        loss, stats = chunked_eopd_loss_and_stats(
            hidden, student_weight, loss_teacher_hidden, teacher_weight, targets, chunk_size=chunk_size, **options
        )
        backward(loss, hidden)

    def trl_chunked_divergence():
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        hidden = loss_student_hidden.clone().requires_grad_(True)
        # Arguments: student hidden/weight/bias, teacher hidden/weight/bias, beta (1.0 = reverse KL), temperature.
        divergence, _entropy = ChunkedDivergenceFunction.apply(
            hidden, student_weight, None, loss_teacher_hidden, teacher_weight, None, 1.0, 1.0
        )
        backward(divergence.sum() / max(divergence.numel(), 1), hidden)

    return {
        "gkd_full_logits": gkd_full,
        "eopd_full_logits": eopd_full,
        "eopd_chunked": eopd_chunked,
        "trl_chunked_divergence": trl_chunked_divergence,
    }


def run_loss_stage(preset, device, dtype, record, out_dir):
    shape = preset["loss"]
    options, chunk_size = eopd_loss_options()
    inputs = loss_stage_inputs(shape, device, dtype)
    variants = loss_stage_variants(inputs, options, chunk_size)
    results = {}
    for name, function in variants.items():
        try:
            results[name] = timed_runs(function, device, shape["warmup"], shape["repeats"])
        except Exception as error:  # noqa: BLE001 - an OOM is a result; anything else is reported and fails the run
            status = "oom" if is_oom(error) else "error"
            results[name] = {"status": status, "error": f"{type(error).__name__}: {error}"}
            if not is_oom(error):
                traceback.print_exc()
        free_memory(device)
        r = results[name]
        detail = f"{r['median_s']:.4f} s, peak {r['peak_mib']:.0f} MiB" if r["status"] == "ok" else r["error"][:200]
        print(f"loss stage {name:24s} {r['status']}: {detail}", flush=True)
    record["loss_stage"] = {
        "shape": shape,
        "loss_tokens": shape["batch"] * shape["completion"],
        "dtype": str(dtype).replace("torch.", ""),
        "eopd_options": options,
        "chunk_size": chunk_size,
        "results": results,
    }
    chunked, trl = results.get("eopd_chunked", {}), results.get("trl_chunked_divergence", {})
    if chunked.get("status") == "ok" and trl.get("status") == "ok":
        short = chunked["median_s"] > trl["median_s"] or chunked["peak_mib"] > trl["peak_mib"]
        if short:
            record["loss_stage"]["profile"] = profile(variants["eopd_chunked"], device, out_dir / "profile_loss.txt")
    del variants, inputs
    free_memory(device)
    return all(r["status"] in ("ok", "oom") for r in results.values())


def profile(function, device, path):
    """Run `function` once under `torch.profiler`; write the operator table to `path`, return its top rows."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        function()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    path.write_text(averages.table(sort_by=key, row_limit=40))

    def self_us(event):
        return event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total

    top = [
        {"op": event.key, "self_ms": self_us(event) / 1000, "calls": event.count}
        for event in sorted(averages, key=self_us, reverse=True)[:10]
    ]
    return {"table": path.name, "top": top}


# ------------------------------------------------------------------------------------------------- 3. training steps


def build_models(preset, device, dtype, tokenizer):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    vocab = preset["steps"]["vocab"]

    def build(spec, seed):
        config = Qwen3Config(
            vocab_size=vocab,
            hidden_size=spec["hidden"],
            intermediate_size=spec["intermediate"],
            num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"],
            num_key_value_heads=spec["kv_heads"],
            head_dim=spec["head_dim"],
            max_position_embeddings=4096,
            tie_word_embeddings=spec["tie"],
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
        )
        return model

    return build(preset["student"], 0), build(preset["teacher"], 1)


def step_datasets(num_rows: int):
    """The same user turns as EOPD/GKD `messages` rows (with a reference answer they never train on) and as
    `DistillationTrainer` conversational `prompt` rows."""
    from datasets import Dataset

    from trl_eopd.tiny import toy_arithmetic_conversations

    rows = toy_arithmetic_conversations(num_rows, seed=0)
    messages = Dataset.from_list([{"messages": row["messages"]} for row in rows])
    prompts = Dataset.from_list([{"prompt": row["messages"][:-1]} for row in rows])
    return messages, prompts


class RolloutTimer:
    """Wraps the student's `generate` (the call all three trainers make) to time and check their rollouts."""

    def __init__(self, model, new_tokens, device):
        self.seconds, self.calls, self.new_tokens, self.device = 0.0, 0, new_tokens, device
        original = model.generate

        def generate(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            prompt_width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            sequences = getattr(out, "sequences", out)  # GKD asks for a dict output
            if sequences.shape[1] - prompt_width != self.new_tokens:
                raise RuntimeError(
                    f"generate produced {sequences.shape[1] - prompt_width} new tokens, not {self.new_tokens}"
                )
            return out

        model.generate = generate


def build_trainers(preset, device, dtype, workdir):
    import torch

    from trl_eopd.tiny import build_tiny_tokenizer

    steps = preset["steps"]
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_models(preset, device, dtype, tokenizer)
    teacher.eval().requires_grad_(False)
    rounds = steps["warmup"] + steps["repeats"] + 1
    messages, prompts = step_datasets(steps["batch"] * rounds)
    on_cuda = device.type == "cuda"
    common = dict(
        per_device_train_batch_size=steps["batch"],
        learning_rate=1e-6,
        beta=1.0,
        temperature=1.0,
        bf16=on_cuda and dtype == torch.bfloat16,
        use_cpu=not on_cuda,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        seed=0,
    )
    trainers = {}

    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_eopd import EOPDConfig, EOPDTrainer

    def student_copy():
        return copy.deepcopy(student)

    gkd_like = dict(max_new_tokens=steps["new_tokens"], lmbda=1.0, max_length=4096, **common)
    trainers["eopd"] = EOPDTrainer(
        model=student_copy(), teacher_model=teacher, args=EOPDConfig(output_dir=f"{workdir}/eopd", **gkd_like),
        train_dataset=messages, processing_class=tokenizer,
    )  # fmt: skip
    trainers["distillation"] = DistillationTrainer(
        model=student_copy(), teacher_model=teacher,
        args=DistillationConfig(output_dir=f"{workdir}/distillation", max_completion_length=steps["new_tokens"],
                                top_k=0, top_p=1.0, **common),
        train_dataset=prompts, processing_class=tokenizer,
    )  # fmt: skip
    trainers["gkd"] = GKDTrainer(
        model=student, teacher_model=teacher, args=GKDConfig(output_dir=f"{workdir}/gkd", **gkd_like),
        train_dataset=messages, processing_class=tokenizer,
    )  # fmt: skip
    timers = {}
    for name, trainer in trainers.items():
        # Forced length: the end tokens stay banned until `new_tokens` tokens are out, for every trainer alike.
        trainer.generation_config.min_new_tokens = steps["new_tokens"]
        trainer.generation_config.max_new_tokens = steps["new_tokens"]
        timers[name] = RolloutTimer(trainer.model, steps["new_tokens"], device)
        trainer.create_optimizer_and_scheduler(num_training_steps=rounds + 1)
        trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this script stands in for
        trainer.model.train()
    return trainers, timers, messages, prompts, tokenizer


def one_step(name, trainer, rows, device):
    """One optimizer step of one micro-batch, rollout included, as the Trainer's loop runs it."""
    if name == "distillation":
        # Its dataloader hands raw rows to `training_step`, whose `_prepare_inputs` generates and tokenizes.
        inputs = rows
    else:
        inputs = trainer.data_collator(rows)
    loss = trainer.training_step(trainer.model, inputs, None)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1
    synchronize(device)
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"{name}: non-finite loss {float(loss)}")


def run_training_steps(preset, device, dtype, record, out_dir):
    steps = preset["steps"]
    with tempfile.TemporaryDirectory() as workdir:
        trainers, timers, messages, prompts, _ = build_trainers(preset, device, dtype, workdir)
        measured = {name: [] for name in trainers}
        rounds = steps["warmup"] + steps["repeats"]
        for round_index in range(rounds):
            rows = slice(round_index * steps["batch"], (round_index + 1) * steps["batch"])
            for name, trainer in trainers.items():
                batch = (
                    [prompts[i] for i in range(rows.start, rows.stop)]
                    if name == "distillation"
                    else [messages[i] for i in range(rows.start, rows.stop)]
                )
                timers[name].seconds = 0.0
                with Peak(device) as peak:
                    start = time.perf_counter()
                    one_step(name, trainer, batch, device)
                    elapsed = time.perf_counter() - start
                label = "warmup" if round_index < steps["warmup"] else "timed"
                print(f"[{label} {round_index}] {name:12s} step {elapsed:7.3f} s  rollout "
                      f"{timers[name].seconds:7.3f} s  peak +{peak.bytes / 2**20:.0f} MiB", flush=True)  # fmt: skip
                if round_index >= steps["warmup"]:
                    measured[name].append((elapsed, timers[name].seconds, peak.bytes))
        tokens = steps["batch"] * steps["new_tokens"]
        results = {}
        for name, values in measured.items():
            step_s = statistics.median(v[0] for v in values)
            rollout_s = statistics.median(v[1] for v in values)
            results[name] = {
                "step_s": step_s,
                "rollout_s": rollout_s,
                "train_part_s": step_s - rollout_s,
                "tokens_per_s": tokens / step_s,
                "peak_mib": max(v[2] for v in values) / 2**20,
                "steps_s": [v[0] for v in values],
            }
        record["training_steps"] = {
            "student": preset["student"],
            "teacher": preset["teacher"],
            "steps": steps,
            "dtype": str(dtype).replace("torch.", ""),
            "completion_tokens_per_step": tokens,
            "results": results,
        }
        eopd, distillation = results["eopd"], results["distillation"]
        if eopd["tokens_per_s"] < 1.2 * distillation["tokens_per_s"]:
            rows = [messages[i] for i in range(steps["batch"])]
            eopd_trainer = trainers["eopd"]
            record["training_steps"]["profile"] = profile(
                lambda: one_step("eopd", eopd_trainer, rows, device), device, out_dir / "profile_step.txt"
            )
        del trainers
    free_memory(device)
    return True


# ------------------------------------------------------------------------------------------------- fsdp2


def _single_process_group(device):
    """A process group of one (FSDP2 needs one; at world size 1 it still makes every parameter a DTensor)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def run_fsdp2(preset, device, record):
    """The chunked loss's value and gradients under FSDP2's `fully_shard` against the unsharded models, then one AdamW
    step of each, through `EOPDTrainer.training_step` on the same batch (dataset completions, no rollout).

    The student and the teacher are sharded as `recipes/accelerate/fsdp2.yaml` has accelerate do it: each decoder
    layer, then the whole model. In float32, so that the two runs differ only by how the weights are held.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from trl_eopd import EOPDConfig, EOPDTrainer
    from trl_eopd.tiny import build_tiny_tokenizer

    spec = preset["fsdp2"]
    shapes = {**preset, "steps": {**preset["steps"], "vocab": spec["vocab"]},
              "student": {**preset["student"], "layers": spec["student_layers"]},
              "teacher": {**preset["teacher"], "layers": spec["teacher_layers"]}}  # fmt: skip
    created_group = _single_process_group(device)
    tokenizer = build_tiny_tokenizer()
    messages, _ = step_datasets(spec["batch"])
    rows = [messages[i] for i in range(spec["batch"])]
    trainers = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in ("unsharded", "fsdp2"):
            student, teacher = build_models(shapes, device, torch.float32, tokenizer)  # same seeds: same weights
            teacher.eval().requires_grad_(False)
            args = EOPDConfig(
                output_dir=f"{workdir}/{name}", per_device_train_batch_size=spec["batch"], lmbda=0.0,
                learning_rate=1e-4, weight_decay=0.0, loss_chunk_size=spec["chunk_size"], max_length=4096,
                bf16=False, use_cpu=device.type != "cuda", gradient_checkpointing=False, report_to="none",
                save_strategy="no", seed=0,
            )  # fmt: skip
            trainer = EOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=messages,
                                  processing_class=tokenizer)  # fmt: skip
            if name == "fsdp2":
                mesh = init_device_mesh(device.type, (1,))
                for model in (trainer.model, trainer.teacher_model):
                    for module in list(model.modules()):
                        if type(module).__name__.endswith("DecoderLayer"):
                            fully_shard(module, mesh=mesh, reshard_after_forward=True)
                    fully_shard(model, mesh=mesh, reshard_after_forward=True)
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1
            trainer.model.train()
            trainers[name] = trainer

        def full(tensor):
            return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().float().clone()

        results = {}
        for name, trainer in trainers.items():
            inputs = trainer.data_collator(rows)
            inputs["eopd_rollout_done"] = True  # dataset completions: nothing to sample
            count = (inputs["labels"][:, 1:] != -100).sum()
            synchronize(device)
            start = time.perf_counter()
            loss = trainer.training_step(trainer.model, inputs, num_items_in_batch=count)
            grads = {n: full(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None}
            before = {n: full(p) for n, p in trainer.model.named_parameters()}
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            updates = {n: full(p) - before[n] for n, p in trainer.model.named_parameters()}
            results[name] = {"loss": float(loss), "grads": grads, "updates": updates,
                             "step_s": time.perf_counter() - start,
                             "dtensor_params": sum(isinstance(p, DTensor) for p in trainer.model.parameters())}  # fmt: skip
        ref, got = results["unsharded"], results["fsdp2"]
        grad_errors = {n: relative_error(got["grads"][n], g) for n, g in ref["grads"].items()}
        update_errors = {n: relative_error(got["updates"][n], u) for n, u in ref["updates"].items() if u.norm() > 0}
        loss_error = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
        # The output head's weight, under its own name or, tied, under the embedding's.
        unsharded_model = trainers["unsharded"].model
        head = next(n for n, p in unsharded_model.named_parameters() if p is unsharded_model.lm_head.weight)
        passed = (
            got["dtensor_params"] > 0  # the student really was sharded
            and set(got["grads"]) == set(ref["grads"])
            and loss_error <= FSDP2_RTOL and max(grad_errors.values()) <= FSDP2_RTOL
            and max(update_errors.values()) <= FSDP2_RTOL
        )  # fmt: skip
        record["fsdp2"] = {
            "shape": spec,
            "world_size": dist.get_world_size(),
            "student_dtensor_params": got["dtensor_params"],
            "loss": {"unsharded": ref["loss"], "fsdp2": got["loss"], "relative_error": loss_error},
            "max_grad_relative_error": max(grad_errors.values()),
            "lm_head_parameter": head,
            "lm_head_grad_relative_error": grad_errors[head],
            "max_update_relative_error": max(update_errors.values()),
            "step_s": {"unsharded": ref["step_s"], "fsdp2": got["step_s"]},
            "tolerance": FSDP2_RTOL,
            "passed": passed,
        }
        print(f"fsdp2: loss rel err {loss_error:.2e}, max grad rel err {max(grad_errors.values()):.2e}, "
              f"max update rel err {max(update_errors.values()):.2e}: {'ok' if passed else 'FAILED'}", flush=True)  # fmt: skip
        del trainers
    if created_group:
        dist.destroy_process_group()
    free_memory(device)
    return passed


# ------------------------------------------------------------------------------------------------- report


def targets(record) -> dict:
    found = {}
    loss = record.get("loss_stage", {}).get("results", {})
    chunked, trl = loss.get("eopd_chunked", {}), loss.get("trl_chunked_divergence", {})
    if chunked.get("status") == "ok" and trl.get("status") == "ok":
        found["chunked_time_vs_trl"] = chunked["median_s"] / trl["median_s"]
        found["chunked_peak_vs_trl"] = chunked["peak_mib"] / max(trl["peak_mib"], 1e-9)
        found["loss_target_met"] = found["chunked_time_vs_trl"] <= 1.0 and found["chunked_peak_vs_trl"] <= 1.0
    steps = record.get("training_steps", {}).get("results", {})
    if "eopd" in steps and "distillation" in steps:
        found["eopd_tokens_per_s_vs_distillation"] = (
            steps["eopd"]["tokens_per_s"] / steps["distillation"]["tokens_per_s"]
        )
        found["step_target_met"] = found["eopd_tokens_per_s_vs_distillation"] >= 1.2
    return found


def markdown(record) -> str:
    v = record["versions"]
    lines = [
        f"# gpu_check ({record['preset']})",
        "",
        f"Device: {v.get('gpu', v['cpu'])}; torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, "
        f"trl {v['trl']}, triton {v['triton']}. Wall time {record.get('wall_s', float('nan')):.0f} s.",
        "",
    ]
    check = record.get("correctness")
    if check:
        lines += ["## Correctness (relative errors against float64)", "",
                  "| dtype | gate | estimator | beta | top-k | head | loss | grad hidden | grad weight | passed |",
                  "|---|---|---|---:|---|---|---:|---:|---:|---|"]  # fmt: skip
        for r in check["cases"]:
            e = r["errors"]
            lines.append(f"| {r['dtype']} | {r['gate']} | {r['reverse_kl_estimator']} | {r['beta']} | "
                         f"{r['forward_kl_top_k']} | {r['head']} | {e['loss']:.1e} | {e['grad_hidden']:.1e} | "
                         f"{e['grad_weight']:.1e} | {'yes' if r['passed'] else 'NO'} |")  # fmt: skip
        lines += ["", f"Tolerances: {json.dumps(check['tolerances'])}.", ""]
    loss = record.get("loss_stage")
    if loss:
        s = loss["shape"]
        lines += [f"## Loss stage: {loss['loss_tokens']} loss tokens, vocabulary {s['vocab']}, student hidden "
                  f"{s['student_hidden']}, teacher hidden {s['teacher_hidden']}, {loss['dtype']}", "",
                  "| loss | status | median (s) | peak above inputs (MiB) |", "|---|---|---:|---:|"]  # fmt: skip
        for name, r in loss["results"].items():
            if r["status"] == "ok":
                lines.append(f"| {name} | ok | {r['median_s']:.4f} | {r['peak_mib']:.0f} |")
            else:
                lines.append(f"| {name} | {r['status']} | | |")
        lines.append("")
    steps = record.get("training_steps")
    if steps:
        st = steps["steps"]
        lines += [f"## Training steps: batch {st['batch']}, {st['new_tokens']} forced new tokens, HF generate, "
                  f"{steps['dtype']}, median of {st['repeats']} interleaved steps", "",
                  "| trainer | step (s) | rollout (s) | rest (s) | tokens/s | peak above start (MiB) |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in steps["results"].items():
            lines.append(f"| {name} | {r['step_s']:.3f} | {r['rollout_s']:.3f} | {r['train_part_s']:.3f} | "
                         f"{r['tokens_per_s']:.1f} | {r['peak_mib']:.0f} |")  # fmt: skip
        lines.append("")
    fsdp2 = record.get("fsdp2")
    if fsdp2:
        sh = fsdp2["shape"]
        title = (f"## FSDP2 (world size {fsdp2['world_size']}): {sh['student_layers']}/{sh['teacher_layers']} "
                 f"layers, vocabulary {sh['vocab']}, float32, against the unsharded models")  # fmt: skip
        summary = (f"- loss relative error {fsdp2['loss']['relative_error']:.1e}; largest gradient relative error "
                   f"{fsdp2['max_grad_relative_error']:.1e} (lm_head {fsdp2['lm_head_grad_relative_error']:.1e}); "
                   f"largest AdamW update relative error {fsdp2['max_update_relative_error']:.1e}; tolerance "
                   f"{fsdp2['tolerance']:.0e}: {'passed' if fsdp2['passed'] else 'FAILED'}")  # fmt: skip
        lines += [title, "", summary, ""]
    if record.get("targets"):
        lines += ["## Targets", ""] + [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}"
                                       for k, v in record["targets"].items()]  # fmt: skip
    if record.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v.splitlines()[-1]}" for k, v in record["errors"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--device", default=None, help="Defaults to the preset's ('cuda' for h200, 'cpu' for tiny).")
    parser.add_argument("--out", required=True, help="Folder for gpu_check.json, gpu_check.md and any profiles.")
    parser.add_argument("--budget-s", type=float, default=None, help="Skip the sections left after this many seconds.")
    parser.add_argument("--sections", default="correctness,loss_stage,training_steps,fsdp2",
                        help="Comma-separated subset to run.")  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from pathlib import Path

    args = parse_args(argv)
    preset = PRESETS[args.preset]
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; use --preset tiny --device cpu.", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dtype = torch.bfloat16
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else preset["budget_s"]
    started = time.perf_counter()
    record = {"preset": args.preset, "versions": versions(device), "errors": {}, "skipped": []}
    print(json.dumps(record["versions"]), flush=True)

    def save():
        record["wall_s"] = time.perf_counter() - started
        record["targets"] = targets(record)
        (out_dir / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))
        (out_dir / "gpu_check.md").write_text(markdown(record))

    sections = {
        "correctness": lambda: run_correctness(preset, device, record),
        "loss_stage": lambda: run_loss_stage(preset, device, dtype, record, out_dir),
        "training_steps": lambda: run_training_steps(preset, device, dtype, record, out_dir),
        "fsdp2": lambda: run_fsdp2(preset, device, record),
    }
    ok = True
    for name in args.sections.split(","):
        if time.perf_counter() - started > budget:
            record["skipped"].append(name)
            print(f"{name}: skipped, the {budget:.0f} s budget is spent", flush=True)
            continue
        section_start = time.perf_counter()
        try:
            ok = bool(sections[name]()) and ok
        except Exception:  # noqa: BLE001 - one broken section must not hide the others' results
            record["errors"][name] = traceback.format_exc()
            traceback.print_exc()
            ok = False
        record.setdefault("section_s", {})[name] = time.perf_counter() - section_start
        save()
    save()
    for key, value in record["targets"].items():
        print(f"target {key}: {value:.3f}" if isinstance(value, float) else f"target {key}: {value}")
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'} in {record['wall_s']:.0f} s")
    return 0 if ok and not record["skipped"] else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
