"""Test-only harness: EOPDTrainer's training step on a student and teacher sharded with FSDP2, on CPU.

accelerate applies FSDP only on GPUs, so no CPU test reaches EOPD's FSDP2 path through `accelerate launch`. This script
does by hand what accelerate's FSDP2 preparation does with `recipes/accelerate/fsdp2.yaml` (`fully_shard` on every
decoder layer, then on the whole model, `reshard_after_forward=True`, for the student and for the frozen teacher), on
a CPU device mesh over gloo, and then drives the trainer's own `training_step` (the chunked local-teacher loss, inside
the student's forward) for a few AdamW steps; `--uneven_rollout` then samples completions of a different length on
each rank. With `--world_size 1` it runs the same steps unsharded in one process, on the whole batch: the reference
that tests/test_fsdp2.py compares against.

What it stands in for, and so does not test: accelerate's own FSDP2 preparation and its FULL_STATE_DICT saving (done
here with torch's `get_model_state_dict`), and the division of the token count by `accelerator.num_processes` (the
trainer's accelerator sees one process here, so the harness hands each rank the global count already divided by the
world size, which is what `compute_loss` computes under a real launch). The trainer must not see `WORLD_SIZE`, or it
refuses the launch (trl_eopd/launch_check.py); the process group is set up from arguments instead.

    python tests/fsdp2_harness.py OUT --student S --teacher T --data D [--world_size 2 --rank R --port P]

writes OUT/full and OUT/lora (full fine-tuning, then a LoRA student) from rank 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

ROWS = 4
STEPS = 3


def shard(model: torch.nn.Module, mesh) -> None:
    """accelerate's FSDP2 wrapping for TRANSFORMER_BASED_WRAP: each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--variants", default="full,lora", help="each trains and saves into OUT/<variant>")
    parser.add_argument(
        "--uneven_rollout",
        action="store_true",
        help="after the full fine-tuning, sample completions that end at different steps per rank",
    )
    args = parser.parse_args()
    if args.world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world_size)  # fmt: skip
    for variant in args.variants.split(","):
        run_variant(args, Path(args.out) / variant, lora=variant == "lora",
                    uneven_rollout=args.uneven_rollout and variant == "full")  # fmt: skip
    if args.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
        # The device mesh and the FSDP states still hold the gloo group, whose threads can abort the interpreter's
        # teardown (trl_eopd/cli/process_exit.py): end as a launched `trl-eopd train` worker does.
        from trl_eopd.cli.process_exit import exit_without_teardown

        exit_without_teardown(0)


def run_variant(args, out: Path, *, lora: bool, uneven_rollout: bool) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer

    world, rank = args.world_size, args.rank
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    dataset = load_dataset("json", data_files=args.data, split="train")
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = EOPDConfig(
        output_dir=str(out / f"trainer-rank{rank}"), bf16=False, report_to=[], save_strategy="no", seed=0,
        # Dataset completions only: on-policy sampling draws differently in one and in two processes.
        lmbda=0.0, learning_rate=1e-2 if lora else 1e-3, weight_decay=0.0, max_length=128,
        # Small chunks, so that the loss runs several of them over the one gathered lm_head.
        loss_chunk_size=8, forward_kl_top_k=4, forward_kl_coef=1.0, entropy_threshold=0.5,
    )  # fmt: skip
    trainer = EOPDTrainer(
        model=args.student, teacher_model=args.teacher, args=config, train_dataset=dataset,
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    batch = trainer.data_collator([dataset[i] for i in range(ROWS)])
    per_rank = ROWS // world
    local = {key: value[rank * per_rank : (rank + 1) * per_rank] for key, value in batch.items()}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        shard(trainer.model, mesh)
        shard(trainer.teacher_model, mesh)
    trainer.create_optimizer()
    names = [name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad]

    losses, grads = [], {}
    for step in range(STEPS):
        inputs = {key: value.clone() for key, value in local.items()}
        inputs["eopd_rollout_done"] = True  # the window was "rolled out": dataset completions, counted below
        count = (inputs["labels"][:, 1:] != -100).sum().to(torch.float64)
        if world > 1:
            dist.all_reduce(count)
        trainer.model.train()
        loss = trainer.training_step(trainer.model, inputs, num_items_in_batch=count / world).detach()
        if world > 1:
            dist.all_reduce(loss)  # the mean over ranks is what the Trainer logs
            loss = loss / world
        losses.append(loss.item())
        if step == 0:
            grads = {name: full(p.grad) for name, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    out.mkdir(parents=True, exist_ok=True)
    if uneven_rollout:
        # Ranks whose completions end at different steps, as EOS makes them in practice: on rank 0 every token ends a
        # completion. Under FSDP2 every decoding step is a collective, so a rank that has finished must keep stepping
        # until all have, or the others wait for it forever.
        trainer.lmbda = 1.0
        trainer.generation_config.max_new_tokens = 6
        if rank == 0:
            trainer.generation_config.eos_token_id = list(range(trainer.model.config.vocab_size))
        prompt_width = local["prompts"].shape[1]
        (rolled,) = trainer._roll_out_window([{key: value.clone() for key, value in local.items()}])
        new_tokens = rolled["input_ids"].shape[1] - prompt_width
        (out / f"rollout_rank{rank}.json").write_text(json.dumps({"new_tokens": new_tokens}))

    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = trainer.model.state_dict()
    if rank == 0:
        trainer.model.save_pretrained(out / "student", state_dict=state)
        torch.save(grads, out / "grads_step0.pt")
        (out / "losses.json").write_text(json.dumps({"losses": losses, "trained": names}))


if __name__ == "__main__":
    main()
