"""EOPDTrainer's vLLM rollouts with the real engine: weight sync, sampler/trainer agreement, batch layout, call count.

Every trainer here builds its engine in float32 (see `float32_engine`), where vLLM's log-probability of a sampled
token and the student's own log-softmax agree to about 1e-7 when the engine holds the student's current weights, and
differ by 0.1 to 1.5 when it holds stale ones (the learning rate is large on purpose, so each step moves the weights).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_eopd import EOPDConfig, EOPDTrainer
from trl_eopd.rollouts import MISMATCH_METRIC
from trl_eopd.tiny import IM_END, build_tiny_model, build_tiny_tokenizer, toy_arithmetic_conversations

TOLERANCE = 1e-4
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-assets")
    tokenizer = build_tiny_tokenizer()
    paths = {}
    for name, tied in (("tied", True), ("untied", False)):
        # Heads 32 wide: the CPU engine's smallest.
        model = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, tie_word_embeddings=tied, seed=1)  # fmt: skip
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    teacher = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, seed=2)
    teacher.save_pretrained(root / "teacher")
    paths["teacher"] = str(root / "teacher")
    paths["root"] = root
    return paths


def _trainer(assets, student: str, *, gradient_accumulation_steps: int, peft: bool = False, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(assets[student])
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                 task_type="CAUSAL_LM")  # fmt: skip
    options = dict(
        output_dir=str(assets["root"] / f"out-{student}-{peft}"),
        use_vllm=True,
        vllm_gpu_memory_utilization=0.05,
        vllm_max_model_length=128,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=STEPS,
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
    options.update(overrides)
    return EOPDTrainer(
        model=AutoModelForCausalLM.from_pretrained(assets[student], dtype=torch.float32),
        teacher_model=assets["teacher"],
        args=EOPDConfig(**options),
        train_dataset=Dataset.from_list(toy_arithmetic_conversations(24)),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _count_calls(trainer, monkeypatch) -> dict:
    calls = {"generate": 0, "sync_weights": 0}
    generation = trainer._rollouts.generation
    for name in calls:
        original = getattr(generation, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(generation, name, counted)
    return calls


@pytest.mark.parametrize(
    "student, peft, gradient_accumulation_steps",
    [("tied", False, 1), ("untied", False, 3), ("untied", True, 2)],
    ids=["tied-head", "untied-head", "lora"],
)
def test_engine_samples_from_the_updated_student_every_step(
    assets, float32_engine, monkeypatch, student, peft, gradient_accumulation_steps
):
    trainer = _trainer(assets, student, peft=peft, gradient_accumulation_steps=gradient_accumulation_steps)
    calls = _count_calls(trainer, monkeypatch)
    before = copy.deepcopy({k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad})
    trainer.train()

    # One weight push and one engine call per optimizer step, whatever the accumulation.
    assert calls == {"generate": STEPS, "sync_weights": STEPS}
    moved = max((p.detach() - before[k]).abs().max().item()
                for k, p in trainer.model.named_parameters() if p.requires_grad)  # fmt: skip
    assert moved > 1e-2, "the student barely moved, so this test could not see a stale engine"

    # Measured at every step on the tokens the engine sampled, right after that step's sync: steps 2 and 3 sample
    # from weights the previous optimizer step wrote.
    logged = [entry[MISMATCH_METRIC] for entry in trainer.state.log_history if MISMATCH_METRIC in entry]
    assert len(logged) == STEPS
    assert max(logged) < TOLERANCE, logged

    # The same measurement sees a stale engine: change the student without a new step (so no sync) and sample again.
    rollouts = trainer._rollouts
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    trainer.state.global_step = STEPS - 1  # the last step again: the engine was already synced for it
    trainer.state.logging_steps = 1
    rollouts.mismatch_values.clear()
    batch = trainer._prepare_inputs(trainer.data_collator([dict(r) for r in trainer.train_dataset.select(range(2))]))
    trainer._roll_out_window([batch])
    trainer.compute_loss(trainer.model, batch)  # the loss measures the mismatch from its own log-probs
    stale = rollouts.mismatch_values
    assert calls["sync_weights"] == STEPS and stale and stale[0] > 0.05, stale

    # After a sync the engine agrees again.
    trainer.state.global_step = STEPS
    rollouts.mismatch_values.clear()
    batch = trainer._prepare_inputs(trainer.data_collator([dict(r) for r in trainer.train_dataset.select(range(2))]))
    trainer._roll_out_window([batch])
    trainer.compute_loss(trainer.model, batch)
    assert rollouts.mismatch_values[0] < TOLERANCE


def test_log_probs_only_on_logged_steps_and_no_extra_forward_pass(assets, float32_engine, monkeypatch):
    import trl_eopd.trainer as trainer_module

    trainer = _trainer(assets, "untied", gradient_accumulation_steps=1, max_steps=4, logging_steps=2)
    generation = trainer._rollouts.generation
    requested, forwards = [], Counter()
    original_generate, original_hidden = generation.generate, trainer_module.last_hidden_state

    def recording(*args, **kwargs):
        requested.append(generation.logprobs)
        return original_generate(*args, **kwargs)

    def counting(*args, **kwargs):
        forwards[trainer.state.global_step] += 1
        return original_hidden(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    monkeypatch.setattr(trainer_module, "last_hidden_state", counting)
    trainer.train()

    # Steps 2 and 4 are logged: only their engine calls ask for the sampled tokens' log-probs.
    assert requested == [None, 0, None, 0]
    # A measured step runs the same forward passes as an unmeasured one (step 1 also checks the output projection).
    assert forwards[1] == forwards[2] == forwards[3] == 2, forwards
    logged = [entry[MISMATCH_METRIC] for entry in trainer.state.log_history if MISMATCH_METRIC in entry]
    assert len(logged) == 2 and max(logged) < TOLERANCE, logged


def test_rollout_batch_matches_the_generate_path_layout(assets, float32_engine, monkeypatch):
    """The batch built from vLLM's completions equals GKD's own post-processing of `generate` output with them.

    `generate` returns the prompts followed by the completions, right-padded with the pad id after each one's EOS;
    replaying exactly that through `GKDTrainer.generate_on_policy_outputs` gives the `generate` path's batch.
    """
    trainer = _trainer(assets, "untied", gradient_accumulation_steps=1, max_steps=1, max_new_tokens=48)
    recorded = []
    generation = trainer._rollouts.generation
    original = generation.generate

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        recorded.append([list(c) for c in out[1]])
        return out

    monkeypatch.setattr(generation, "generate", recording)
    rows = [dict(r) for r in trainer.train_dataset.select(range(8))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    prompts, prompt_mask = batch["prompts"].clone(), batch["prompt_attention_mask"].clone()
    assert (prompt_mask == 0).any(), "prompts of one length would not exercise the left padding"
    [ours] = trainer._roll_out_window([dict(batch)])
    [completions] = recorded
    lengths = [len(c) for c in completions]
    assert min(lengths) < max(lengths) == trainer.args.max_new_tokens, lengths  # early stops and a full-length one

    pad = trainer.processing_class.pad_token_id
    sequences = torch.full((len(completions), prompts.shape[1] + max(lengths)), pad, dtype=prompts.dtype)
    sequences[:, : prompts.shape[1]] = prompts
    for row, completion in enumerate(completions):
        sequences[row, prompts.shape[1] : prompts.shape[1] + len(completion)] = torch.tensor(completion)

    class _Replay:
        def generate(self, input_ids, attention_mask, **kwargs):
            assert torch.equal(input_ids, prompts) and torch.equal(attention_mask, prompt_mask)
            return type("Generated", (), {"sequences": sequences.clone()})()

    input_ids, attention_mask, labels = trainer.generate_on_policy_outputs(
        _Replay(), {"prompts": prompts, "prompt_attention_mask": prompt_mask}, trainer.generation_config
    )
    trainer._replace_student_eos(input_ids, labels)
    torch.testing.assert_close(ours["input_ids"], input_ids, rtol=0, atol=0)
    torch.testing.assert_close(ours["attention_mask"], attention_mask, rtol=0, atol=0)
    torch.testing.assert_close(ours["labels"], labels, rtol=0, atol=0)
    # The normalisation count: every sampled token, the EOS included, and nothing else.
    assert trainer._count_loss_tokens([ours]) == trainer._count_loss_tokens([{"labels": labels}]) == sum(lengths)
