"""A ChatML collator that never cuts a prompt to fit `max_length`.

TRL's `DataCollatorForChatML` keeps the last `max_length` tokens of prompt + completion, so a long reference completion
pushes the prompt out from the left, silently: the student then generates from a fragment of the prompt (often just
the assistant header). For on-policy distillation the prompt is the only part of a row that is used, so this collator
keeps it whole and shortens the reference completion from the right instead, with a warning that counts the rows
concerned. A prompt that alone exceeds `max_length` is an error: no truncation keeps its meaning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ._gkd import DataCollatorForChatML


@dataclass
class PromptKeepingChatMLCollator(DataCollatorForChatML):
    """`DataCollatorForChatML` that keeps every prompt whole and cuts only the reference completion to `max_length`."""

    def __post_init__(self):
        super().__post_init__()
        self.num_examples = 0
        self.num_truncated = 0
        self._next_report = 1

    def __call__(self, examples):
        fitted = [self._fit(example) for example in examples]
        truncated_here = sum(example is not original for example, original in zip(fitted, examples))
        self.num_examples += len(examples)
        if truncated_here:
            self.num_truncated += truncated_here
            self._report(truncated_here, len(examples))
        return super().__call__(fitted)

    def _fit(self, example: dict) -> dict:
        if "input_ids" in example or self.messages_key not in example:
            return example
        messages = example[self.messages_key]
        full_text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        full_ids = self._encode(full_text)
        if len(full_ids) <= self.max_length:
            return example
        prompt_text = example.get(self.prompt_key)
        if prompt_text is None:
            prompt_text = self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        prompt_length = len(self._encode(prompt_text))
        if prompt_length > self.max_length:
            raise ValueError(
                f"A prompt has {prompt_length} tokens, more than `max_length={self.max_length}` (which bounds "
                "prompt + completion). Cutting it would make the student answer a fragment of the question. Raise "
                "`max_length`, or drop or shorten the long prompts before training (e.g. `dataset.filter(...)`). "
                "Prompt starts: "
                f"{prompt_text[:80]!r}"
            )
        kept = full_ids[: self.max_length]
        return {
            **example,
            "input_ids": kept,
            "attention_mask": [1] * len(kept),
            # The parent reads the prompt/completion boundary from here instead of re-deriving it after truncation.
            "completion_mask": [0] * prompt_length + [1] * (len(kept) - prompt_length),
        }

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, return_tensors=None)["input_ids"]

    def _report(self, truncated_here: int, batch_size: int) -> None:
        # Reported at the 1st, 2nd, 4th, 8th... cut row: never silent, and never one line per batch.
        if self.num_truncated < self._next_report:
            return
        while self._next_report <= self.num_truncated:
            self._next_report *= 2
        warnings.warn(
            f"EOPDTrainer: {truncated_here} of {batch_size} rows in this batch ({self.num_truncated} of "
            f"{self.num_examples} rows so far) have prompt + reference completion longer than "
            f"`max_length={self.max_length}` tokens. Their prompts are kept whole and their reference completions cut "
            "to fit; generated batches replace those completions anyway, but batches that train on the dataset's "
            "completions (lmbda < 1 without seq_kd) see the cut text. Raise `max_length` to keep them whole.",
            stacklevel=2,
        )
