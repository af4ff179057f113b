"""One process of the 2-process colocate run in `test_vllm_end_to_end.py` (launched with `accelerate launch`).

Each process trains the same EOPD run with its own colocated float32 engine and writes what it saw to
`<output_dir>/rank<N>.json`: the on-policy decision of every micro-batch, the engine calls and weight pushes, and the
logged history. The processes start from different Python random states on purpose, so agreeing decisions can only
come from the trainer sharing them.
"""

import functools
import json
import os
import random
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import trl.generation.vllm_generation as vllm_generation
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer
    from trl_eopd.tiny import IM_END, toy_arithmetic_conversations

    torch.set_num_threads(1)
    # float32 engines, as in conftest.py's `float32_engine`.
    vllm_generation.LLM = functools.partial(vllm_generation.LLM, dtype="float32", enforce_eager=True)
    student, teacher, output_dir = sys.argv[1:4]
    args = EOPDConfig(
        output_dir=output_dir,
        use_cpu=True,  # with torchrun's environment, accelerate's 2-process CPU (gloo) setup
        use_vllm=True,
        vllm_gpu_memory_utilization=0.05,
        vllm_max_model_length=128,
        lmbda=0.5,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        max_new_tokens=12,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        bf16=False,
        report_to="none",
        save_strategy="no",
        teacher_eos_token=IM_END,
        seed=0,
    )
    trainer = EOPDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(toy_arithmetic_conversations(32)),
        processing_class=AutoTokenizer.from_pretrained(student),
    )
    rank = trainer.accelerator.process_index
    seen = {"decisions": [], "generate": 0, "sync_weights": 0}
    rollouts = trainer._rollouts
    decide = rollouts.on_policy_decisions

    def recorded_decisions(*a, **k):
        decisions = decide(*a, **k)
        seen["decisions"].append(decisions)
        return decisions

    rollouts.on_policy_decisions = recorded_decisions
    for name in ("generate", "sync_weights"):
        original = getattr(rollouts.generation, name)

        def counted(*a, _name=name, _original=original, **k):
            seen[_name] += 1
            return _original(*a, **k)

        setattr(rollouts.generation, name, counted)
    random.seed(1000 + rank)
    trainer.train()
    seen["log_history"] = trainer.state.log_history
    seen["world_size"] = trainer.accelerator.num_processes
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
