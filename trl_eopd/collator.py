"""A ChatML collator that never cuts a prompt to fit `max_length`, and the checks that a dataset suits it.

TRL's `DataCollatorForChatML` keeps the last `max_length` tokens of prompt + completion, so a long reference completion
pushes the prompt out from the left, silently: the student then generates from a fragment of the prompt (often just
the assistant header). For on-policy distillation the prompt is the only part of a row that is used, so this collator
keeps it whole and shortens the reference completion from the right instead, with a warning that counts the rows
concerned. A prompt that alone exceeds `max_length` is an error: no truncation keeps its meaning.

The checks read only what a dataset can tell without being consumed: its length and row 0 for a map-style dataset; its
`column_names` and a first row read through `take(1)` (a fresh iteration, so training still starts at row 0) for a
streaming `datasets.IterableDataset`; nothing for other iterables, whose errors then come from the collator.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ._gkd import DataCollatorForChatML

# The dataset column that names each row's served teacher (the column of TRL's `AsyncDistillationTrainer`).
TEACHER_ID_COLUMN = "teacher_id"


_NO_ROW = object()


def _first_row(dataset) -> Any:
    """Row 0 of `dataset` without consuming it, `None` if it has no rows, or `_NO_ROW` if it cannot be read safely."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return dataset[0] if len(dataset) > 0 else None
    take = getattr(dataset, "take", None)
    if callable(take):
        # `take(1)` returns a new dataset that iterates the source from its start, independently of any other
        # iteration, so the trainer's own pass over a stream is untouched.
        return next(iter(take(1)), None)
    return _NO_ROW


def _splits(dataset, name: str):
    if isinstance(dataset, dict):
        for key, split in dataset.items():
            yield split, f"{name}[{key!r}]"
    elif dataset is not None:
        yield dataset, name


def check_not_empty(dataset, name: str) -> None:
    """Fail, naming `name`, when `dataset` (or a split of a dict of datasets) has no rows."""
    for split, split_name in _splits(dataset, name):
        empty = len(split) == 0 if hasattr(split, "__len__") else _first_row(split) is None
        if empty:
            raise ValueError(
                f"`{split_name}` is empty (0 rows): there is nothing to train or evaluate on. Check the dataset's "
                "split, filters and `max_train_samples`-style selections."
            )


def check_dataset_columns(dataset, name: str) -> None:
    """Fail early, naming the column, when the default collator could not read `dataset` (or a split of a dict)."""
    for split, split_name in _splits(dataset, name):
        _check_columns(split, split_name)


def _check_columns(dataset, name: str) -> None:
    columns = getattr(dataset, "column_names", None)
    first = _NO_ROW
    if columns is None:  # a stream whose features are unknown until read (e.g. after `map`): its first row says
        first = _first_row(dataset)
        if not isinstance(first, dict):
            return
        columns = list(first)
    has_messages = "messages" in columns
    has_tokenized = "input_ids" in columns and "prompt" in columns
    if not (has_messages or has_tokenized):
        raise ValueError(
            f"`{name}` has columns {sorted(columns)}, but EOPDTrainer's default collator needs a `messages` column "
            "(a list of {'role', 'content'} dicts whose last message is the assistant completion), or pre-tokenized "
            "`input_ids` together with a `prompt` column. Convert prompt/completion data to `messages`, or pass your "
            "own `data_collator`."
        )
    if not has_messages:
        return
    if first is _NO_ROW:
        first = _first_row(dataset)
    if not isinstance(first, dict):
        return
    messages = first["messages"]
    if (
        not isinstance(messages, list)
        or len(messages) < 2
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
        raise ValueError(
            f"`{name}` column `messages` must hold lists of at least two {{'role', 'content'}} dicts (a prompt, "
            f"then the assistant completion); row 0 is {messages!r:.200}."
        )


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
        batch = super().__call__(fitted)
        # Each row's teacher, for a mapping of served teachers (`trl_eopd/teacher_routing.py`); the parent drops it.
        if examples and TEACHER_ID_COLUMN in examples[0]:
            batch[TEACHER_ID_COLUMN] = [example.get(TEACHER_ID_COLUMN) for example in examples]
        return batch

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
            prompt_text = self._prompt_text(messages)
        prompt_length = len(self._encode(prompt_text))
        if prompt_length > self.max_length:
            raise ValueError(self._too_long(prompt_length, prompt_text, "A prompt"))
        kept = full_ids[: self.max_length]
        return {
            **example,
            "input_ids": kept,
            "attention_mask": [1] * len(kept),
            # The parent reads the prompt/completion boundary from here instead of re-deriving it after truncation.
            "completion_mask": [0] * prompt_length + [1] * (len(kept) - prompt_length),
        }

    def check_prompts_fit(self, dataset, name: str, batch_size: int = 1000) -> None:
        """Raise the error `__call__` would raise mid-training, now, for the first prompt of `dataset` (rows with a
        `messages` column) longer than `max_length`, naming `name` and the row."""
        if self.max_length is None:
            return
        for start in range(0, len(dataset), batch_size):
            # A slice at a time, so that a large dataset is never held in memory as Python objects all at once.
            conversations = dataset[start : start + batch_size][self.messages_key]
            texts = [self._prompt_text(messages) for messages in conversations]
            encoded = self.tokenizer(texts, add_special_tokens=False, return_tensors=None)["input_ids"]
            for offset, ids in enumerate(encoded):
                if len(ids) > self.max_length:
                    what = f"Row {start + offset} of {name}: its prompt"
                    raise ValueError(self._too_long(len(ids), texts[offset], what))

    def _prompt_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)

    def _too_long(self, prompt_length: int, prompt_text: str, what: str) -> str:
        return (
            f"{what} has {prompt_length} tokens, more than `max_length={self.max_length}` (which bounds prompt + "
            "completion). Cutting it would make the student answer a fragment of the question. Raise `max_length`, "
            "or drop or shorten the long prompts before training (e.g. `dataset.filter(...)`). Prompt starts: "
            f"{prompt_text[:80]!r}"
        )

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
