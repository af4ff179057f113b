"""Teacher and student models for the demo, and the plain-PyTorch supervised loop that trains them from scratch."""

from __future__ import annotations

import math
import random

import torch

from ..tiny import build_tiny_model
from .task import IM_END

TEACHER_SIZE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT_SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def build_model(tokenizer, size: dict, seed: int):
    """A randomly initialised Qwen3 causal LM that ends its turn with `<|im_end|>`."""
    return build_tiny_model(tokenizer, seed=seed, eos_token=IM_END, **size)


def encode_conversations(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """Token ids of each chat row and the length of its prompt (the part ending in `<|im_start|>assistant`)."""
    encoded = []
    for row in rows:
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        encoded.append((ids, prompt_len))
    return encoded


def _batch(encoded, pad_id):
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention_mask, labels


def supervised_train(
    model,
    tokenizer,
    rows_fn,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    warmup_steps: int = 50,
    progress: str | None = None,
) -> list[float]:
    """Train `model` on completion tokens with cross-entropy, AdamW and a warmup-cosine schedule; return the losses.

    `rows_fn(step, rng)` returns the chat rows of one batch. Fresh rows per step (a new solution drawn for each
    problem every time) teach the model the whole distribution over valid solutions rather than one of them.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(steps - warmup_steps, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    bar = tqdm(range(steps), desc=progress, disable=progress is None, leave=False)
    for step in bar:
        input_ids, attention_mask, labels = _batch(
            encode_conversations(tokenizer, rows_fn(step, rng, batch_size)), tokenizer.pad_token_id
        )
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
