"""Per-GPU memory of the model states of each paper recipe under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (4 x 80 GB by default).

    python scripts/memory_table.py                  # 4 GPUs, markdown table
    python scripts/memory_table.py --num_gpus 8
    python scripts/memory_table.py --num_gpus 8 --teacher_server_gpus 2   # also: the teacher on a vLLM server

Parameter counts are exact: each Qwen3 model is instantiated on PyTorch's `meta` device (no memory, no download) from
the architecture numbers below, and its unique parameters are counted, so tied embeddings count once. Student memory
comes from DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`,
the functions behind the `..._all_cold` printers), without optimizer or parameter offload: they count bf16 weights,
gradients and AdamW states (fp32 master weights and two moments). The teacher is frozen and has no gradients or
optimizer states: TRL's `prepare_deepspeed` keeps a full bf16 copy per GPU under ZeRO-2 (it runs the teacher at stage
0) and shards it under ZeRO-3, so it costs 2 bytes per parameter, divided by the number of GPUs under ZeRO-3.

FSDP2 (`recipes/accelerate/fsdp2.yaml`, bf16 mixed precision) has no estimator; its rows count what it keeps. The
recipes load the student in fp32, and FSDP2 keeps those fp32 weights sharded as the optimizer's own copy: 16 bytes per
parameter divided by the number of GPUs (weights, gradients and AdamW's two moments, all fp32), with no separate bf16
copy. On top, as DeepSpeed's ZeRO-3 estimator counts its largest layer, 4 bytes per parameter of the largest FSDP unit
(bf16 gathered weights and their gradients before the reduce-scatter): a decoder layer, or the root unit, which holds
every parameter outside the decoder layers (embedding, final norm, untied output head). The teacher, frozen and loaded
in bf16, is sharded the same way: 2 bytes per parameter divided by the number of GPUs.

With `--teacher_server_gpus T`, a second table splits the node: the teacher served by vLLM on T GPUs (its bf16
weights split by tensor parallelism, 2 bytes per parameter / T per GPU) and the trainers on the other GPUs, which
then hold no teacher at all. "saved per trainer GPU" is the teacher's share that a trainer GPU no longer holds,
against a local teacher on the same trainer GPUs; the server's KV cache and activations are not counted.

Not included: activations, the rollouts' KV cache, the chunked loss's logits and allocator fragmentation. They depend
on batch size and sequence length; the "left for activations" column is what remains of the GPU for them.

Architecture numbers (config.json of each model; the -Base checkpoints share their post-trained sibling's shapes):
  Qwen3-0.6B: hidden 1024, intermediate 3072, 28 layers, 16 query / 8 KV heads, head_dim 128, vocab 151936, tied.
    huggingface.co/TensorStack/TextEncoder/blob/main/Qwen-3-06B/config.json (a copy of Qwen/Qwen3-0.6B's);
    a Qwen3-0.6B-Base derivative with eos 151643 has the same shapes
    (huggingface.co/clejordan/MNLP_M3_bnbquantized8_last/blob/main/config.json).
  Qwen3-1.7B: hidden 2048, intermediate 6144, 28 layers, 16 / 8 heads, head_dim 128, vocab 151936, tied.
    github.com/zyzshishui/slime scripts/models/qwen3-1.7B.sh (Megatron args for Qwen3-1.7B) and a Qwen/Qwen3-1.7B
    config.json fixture with tie_word_embeddings true in a public checkpoint-inspection test.
  Qwen3-4B: hidden 2560, intermediate 9728, 36 layers, 32 / 8 heads, head_dim 128, vocab 151936, tied.
    huggingface.co/MultiRL/qwen3_4b_instruct_sft/blob/main/config.json (Qwen3-4B shapes, transformers 4.51.0).
  Qwen3-8B: hidden 4096, intermediate 12288, 36 layers, 32 / 8 heads, head_dim 128, vocab 151936, untied.
    "Copy config.json from Qwen/Qwen3-8B", huggingface.co/thejaminator/qwen-hook-layer-9 (commit 478fb72).
Cross-check: Qwen's model cards give 0.6B / 1.7B / 4.0B / 8.2B parameters; the counts printed here agree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Arch:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool


ARCHS = {
    "Qwen/Qwen3-0.6B-Base": Arch("Qwen3-0.6B-Base", 1024, 3072, 28, 16, 8, 128, 151936, True),
    "Qwen/Qwen3-1.7B-Base": Arch("Qwen3-1.7B-Base", 2048, 6144, 28, 16, 8, 128, 151936, True),
    "Qwen/Qwen3-4B-Base": Arch("Qwen3-4B-Base", 2560, 9728, 36, 32, 8, 128, 151936, True),
    "Qwen/Qwen3-8B": Arch("Qwen3-8B", 4096, 12288, 36, 32, 8, 128, 151936, False),
}

# (recipe, student, teacher): the paper's three setups; the OPD baselines have the same footprint.
RECIPES = [
    ("qwen3-0.6b-math-eopd", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-8B"),
    ("qwen3-1.7b-math-eopd", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B"),
    ("qwen3-4b-dapo-eopd", "Qwen/Qwen3-4B-Base", "Qwen/Qwen3-8B"),
]


def count_parameters(arch: Arch) -> tuple[int, int]:
    """(total unique parameters, parameters of the largest single module), counted on the meta device."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # `parameters()` yields a tied weight once
    # ZeRO-3 gathers one module's own parameters at a time; DeepSpeed's "largest layer" is the biggest such set.
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def fsdp2_largest_unit(arch: Arch) -> int:
    """Parameters of the largest unit `fully_shard` gathers at once under fsdp2.yaml (TRANSFORMER_BASED_WRAP)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
        tie_word_embeddings=arch.tie_word_embeddings,
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    in_layers = {id(p) for p in model.model.layers.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    return max(layer, root)


def fsdp2_student_bytes(total: int, largest_unit: int, num_gpus: int) -> tuple[int, int]:
    """(weights, gradients + AdamW) per GPU under FSDP2 with an fp32 student and bf16 compute."""
    return 4 * total // num_gpus + 2 * largest_unit, 12 * total // num_gpus + 2 * largest_unit


def student_bytes(total: int, largest: int, num_gpus: int, stage: int) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=num_gpus, cpu_offload=False)
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=num_gpus, cpu_offload=False, cpu_offload_params=False
        )
    return gpu


def student_weight_bytes(total: int, num_gpus: int, stage: int) -> int:
    # bf16 weights: replicated under ZeRO-2, sharded under ZeRO-3.
    return 2 * total if stage == 2 else 2 * total // num_gpus


def teacher_bytes(total: int, num_gpus: int, stage: int) -> int:
    return 2 * total if stage == 2 else 2 * total // num_gpus


def build_rows(num_gpus: int, gpu_gib: float) -> list[dict]:
    counts = {model: count_parameters(arch) for model, arch in ARCHS.items()}
    rows = []
    for recipe, student, teacher in RECIPES:
        s_total, s_largest = counts[student]
        t_total, _ = counts[teacher]
        for stage in (2, 3, "FSDP2"):
            if stage == "FSDP2":
                weights, grads_optim = fsdp2_student_bytes(s_total, fsdp2_largest_unit(ARCHS[student]), num_gpus)
                teach = 2 * t_total // num_gpus
                rows.append({"recipe": recipe, "stage": "FSDP2", "student_params": s_total, "teacher_params": t_total,
                             "student_weights": weights, "student_grads_optim": grads_optim, "teacher": teach,
                             "total": weights + grads_optim + teach,
                             "left": gpu_gib * GIB - (weights + grads_optim + teach)})  # fmt: skip
                continue
            states = student_bytes(s_total, s_largest, num_gpus, stage)
            weights = student_weight_bytes(s_total, num_gpus, stage)
            teach = teacher_bytes(t_total, num_gpus, stage)
            total = states + teach
            rows.append(
                {
                    "recipe": recipe,
                    "stage": f"ZeRO-{stage}",
                    "student_params": s_total,
                    "teacher_params": t_total,
                    "student_weights": weights,
                    "student_grads_optim": states - weights,
                    "teacher": teach,
                    "total": total,
                    "left": gpu_gib * GIB - total,
                }
            )
    return rows


def build_split_rows(num_gpus: int, server_gpus: int, gpu_gib: float) -> list[dict]:
    """Trainer and server per-GPU memory with the teacher served on `server_gpus` of `num_gpus` GPUs."""
    counts = {model: count_parameters(arch) for model, arch in ARCHS.items()}
    trainer_gpus = num_gpus - server_gpus
    rows = []
    for recipe, student, teacher in RECIPES:
        s_total, s_largest = counts[student]
        t_total, _ = counts[teacher]
        for stage in (2, 3):
            everywhere = student_bytes(s_total, s_largest, num_gpus, stage) + teacher_bytes(t_total, num_gpus, stage)
            served = student_bytes(s_total, s_largest, trainer_gpus, stage)
            saved = teacher_bytes(t_total, trainer_gpus, stage)
            server = 2 * t_total / server_gpus
            rows.append(
                {
                    "recipe": recipe,
                    "stage": f"ZeRO-{stage}",
                    "local_all": everywhere,
                    "served_trainer": served,
                    "saved": saved,
                    "server": server,
                    "server_left": gpu_gib * GIB - server,
                }
            )
    return rows


def split_markdown(rows: list[dict], num_gpus: int, server_gpus: int, gpu_gib: float) -> str:
    def gib(n: float) -> str:
        return f"{n / GIB:.1f}"

    trainer_gpus = num_gpus - server_gpus
    lines = [
        f"Teacher served by vLLM on {server_gpus} of {num_gpus} x {gpu_gib:g} GiB, trainers on {trainer_gpus} (GiB of "
        "model states per GPU; activations, rollouts and the server's KV cache not included)",
        "",
        (
            f"| recipe | ZeRO | local teacher, {num_gpus} trainer GPUs: total | served, {trainer_gpus} trainer GPUs: "
            "total | saved per trainer GPU | server GPU: teacher weights | server GPU: left for KV cache |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['stage']} | {gib(r['local_all'])} | {gib(r['served_trainer'])} | {gib(r['saved'])} "
            f"| {gib(r['server'])} | {gib(r['server_left'])} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict], num_gpus: int, gpu_gib: float) -> str:
    def gib(n: float) -> str:
        return f"{n / GIB:.1f}"

    lines = [
        f"Per-GPU memory of model states on {num_gpus} x {gpu_gib:g} GiB (GiB; activations and rollouts not included)",
        "",
        (
            "| recipe | sharding | student params | teacher params | student weights | student grads + AdamW "
            "| teacher weights (bf16) | total | left for activations |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['stage']} | {r['student_params'] / 1e9:.3f} B | {r['teacher_params'] / 1e9:.3f} B "
            f"| {gib(r['student_weights'])} | {gib(r['student_grads_optim'])} | {gib(r['teacher'])} "
            f"| {gib(r['total'])} | {gib(r['left'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_gpus", type=int, default=4, help="GPUs in total (the paper used 4).")
    parser.add_argument("--gpu_gib", type=float, default=80.0, help="Memory of one GPU in GiB.")
    parser.add_argument(
        "--teacher_server_gpus",
        type=int,
        default=0,
        help="Also print the node split with the teacher served by vLLM on this many GPUs.",
    )
    args = parser.parse_args(argv)
    if args.teacher_server_gpus and not 0 < args.teacher_server_gpus < args.num_gpus:
        parser.error(f"--teacher_server_gpus must be between 1 and {args.num_gpus - 1} (--num_gpus minus one)")
    # Importing DeepSpeed prints accelerator-detection notices; they are not part of the table.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        rows = build_rows(args.num_gpus, args.gpu_gib)
        split = None
        if args.teacher_server_gpus:
            split = build_split_rows(args.num_gpus, args.teacher_server_gpus, args.gpu_gib)
    print(markdown(rows, args.num_gpus, args.gpu_gib))
    if split:
        print()
        print(split_markdown(split, args.num_gpus, args.teacher_server_gpus, args.gpu_gib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
