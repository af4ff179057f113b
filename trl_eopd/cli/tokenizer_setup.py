"""The tokenizer of a `trl-eopd train` run: loaded, padded, chat-template variables fixed, teacher EOS checked."""

from __future__ import annotations

from .. import _compat
from .errors import UsageError


def apply_chat_template_kwargs(tokenizer, kwargs: dict | None) -> None:
    """Fix template variables (e.g. `enable_thinking=False`) inside the chat template, so every renderer sees them."""
    if not kwargs:
        return
    if not tokenizer.chat_template:
        raise UsageError("`chat_template_kwargs` is set but the tokenizer has no chat template.")
    _compat.fix_chat_template_variables(tokenizer, kwargs)


def load_tokenizer(path: str, *, model_args, training_args, script_args):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except OSError as e:
        raise UsageError(f"cannot load the tokenizer of {path!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UsageError(
            f"the tokenizer of {path!r} has no chat template, which GKD's collator needs to split prompt from "
            "completion; set `tokenizer_name_or_path` to one that has (e.g. the teacher's) or set `chat_template_path`."
        )
    apply_chat_template_kwargs(tokenizer, script_args.chat_template_kwargs)
    eos = getattr(training_args, "teacher_eos_token", None)
    if eos is not None:
        ids = tokenizer.encode(eos, add_special_tokens=False)
        if len(ids) != 1:
            raise UsageError(
                f"`teacher_eos_token` {eos!r} is not a single token of the tokenizer of {path!r} (it encodes to {ids})."
            )
    return tokenizer
