"""`EOPDScriptArguments`: the data and script options of `trl-eopd train` (the training options are `EOPDConfig`'s)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ScriptArguments


@dataclass
class EOPDScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus what EOPD's data need: local files, column mapping, prompt formatting.

    Args:
        dataset_name (`str`, *optional*):
            Hub dataset id, local dataset folder, local data file, or `tiny://train`.
        eval_dataset_name (`str`, *optional*):
            Separate evaluation data; defaults to the `dataset_test_split` of `dataset_name`.
        eval_dataset_config (`str`, *optional*):
            Configuration of `eval_dataset_name`.
        eval_dataset_split (`str`, *optional*):
            Split of `eval_dataset_name` (`train` for a local file, else `test`).
        dataset_messages_column (`str`, *optional*, defaults to `"messages"`):
            Column of chat turns ending with the assistant's.
        dataset_prompt_column (`str`, *optional*):
            Prompt column, used when there is no messages column (default `prompt`).
        dataset_completion_column (`str`, *optional*):
            Reference completion column (default `completion` when present).
        prompt_template (`str`, *optional*, defaults to `"{prompt}"`):
            Template for string prompts.
        system_prompt (`str`, *optional*):
            System message prepended to conversations that lack one.
        chat_template_kwargs (`dict` or `str`, *optional*):
            Variables fixed in the tokenizer's chat template.
        tokenizer_name_or_path (`str`, *optional*):
            Tokenizer to use (defaults to the student's).
        max_train_samples (`int`, *optional*):
            Keep only the first N training rows.
        max_eval_samples (`int`, *optional*):
            Keep only the first N evaluation rows.
    """

    # Redeclared only to say what this script accepts beyond a hub id.
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, local dataset folder, or local .json/.jsonl/.parquet/.csv file, or `tiny://train`."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Separate evaluation data: hub id, folder or local file. Defaults to the "
            "`dataset_test_split` of `dataset_name` when `eval_strategy` is not `no`."
        },
    )
    eval_dataset_config: str | None = field(default=None, metadata={"help": "Configuration of `eval_dataset_name`."})
    eval_dataset_split: str | None = field(
        default=None,
        metadata={"help": "Split of `eval_dataset_name` (defaults to `train` for a local file, else `test`)."},
    )
    dataset_messages_column: str = field(
        default="messages",
        metadata={"help": "Column holding chat turns as a list of {role, content}, ending with the assistant's."},
    )
    dataset_prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding the prompt (a string or a list of chat turns), used when there is no messages "
            "column. Defaults to `prompt`. For MATH use `problem`."
        },
    )
    dataset_completion_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding the reference completion. Defaults to `completion` when present. Without one "
            "the data is prompt-only, which requires `lmbda: 1.0` (the student writes every completion)."
        },
    )
    prompt_template: str = field(
        default="{prompt}",
        metadata={
            "help": "Template for string prompts; `{prompt}` is replaced by the prompt text (other braces, "
            "e.g. `\\boxed{}`, are kept as is)."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message prepended to every conversation that lacks one."}
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Variables fixed in the tokenizer's chat template, as a dict (YAML) or JSON string, e.g. "
            '`{"enable_thinking": false}` for a Qwen3 teacher with thinking off. They are written into the template, '
            "so the saved tokenizer keeps them."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (defaults to the student's, as in GKD)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})
