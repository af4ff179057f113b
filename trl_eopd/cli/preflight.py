"""Checks `trl-eopd train` makes before any weights load: model paths and vocabularies, checkpoint, output folder,
prompt lengths."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .._paths import missing_local_path
from .errors import UsageError


def check_vocabularies(student: str, teacher: str, *, model_args, training_args) -> None:
    """Both models exist and share a vocabulary, read from their configs alone."""
    from transformers import AutoConfig

    def vocab(path: str, revision: str | None) -> int:
        if missing_local_path(path):
            raise UsageError(
                f"model path {path!r} does not exist; give a folder saved with `save_pretrained` or a Hub id."
            )
        try:
            config = AutoConfig.from_pretrained(
                path, revision=revision, trust_remote_code=training_args.trust_remote_code
            )
        except OSError as e:
            raise UsageError(f"cannot read the model config of {path!r}: {e}") from None
        return config.get_text_config().vocab_size

    teacher_revision = (training_args.teacher_model_init_kwargs or {}).get("revision")
    student_vocab = vocab(student, model_args.model_revision)
    teacher_vocab = vocab(teacher, teacher_revision)
    if student_vocab != teacher_vocab:
        raise UsageError(
            f"the teacher {teacher!r} has a vocabulary of {teacher_vocab} tokens but the student {student!r} has "
            f"{student_vocab}. EOPD compares the two next-token distributions id by id, so both models need the same "
            "tokenizer and vocab_size (e.g. Qwen3-8B with a Qwen3 base student)."
        )


def check_prompt_lengths(tokenizer, training_args, datasets: dict) -> None:
    """Every prompt fits in `max_length`, checked as the trainer's collator will check it batch by batch (the error
    would otherwise come mid-training). `datasets` maps a label to a dataset with a `messages` column, or `None`."""
    from ..collator import PromptKeepingChatMLCollator

    collator = PromptKeepingChatMLCollator(tokenizer=tokenizer, max_length=training_args.max_length)
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        try:
            collator.check_prompts_fit(dataset, name)
        except ValueError as e:
            raise UsageError(str(e)) from None


def resume_target(training_args) -> str | bool | None:
    """What to pass to `trainer.train(resume_from_checkpoint=...)`, after checking that it exists."""
    value = training_args.resume_from_checkpoint
    if value is None or value == "":
        return None
    if str(value).lower() in ("true", "latest", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        if not os.path.isdir(training_args.output_dir) or get_last_checkpoint(training_args.output_dir) is None:
            raise UsageError(
                f"`resume_from_checkpoint: {value}` but {training_args.output_dir} holds no checkpoint-* folder."
            )
        return True
    if str(value).lower() in ("false", "none"):
        return None
    if not os.path.isdir(value):
        raise UsageError(f"checkpoint {value!r} (from resume_from_checkpoint) does not exist.")
    return value


_FINISHED_RUN_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "training_args.bin")


def finished_run(output_dir: str | os.PathLike, files: tuple[str, ...]) -> str | None:
    """`"<output_dir> already holds a finished run (saved <time>)"` when one of `files` is in it, else `None`."""
    output_dir = Path(output_dir)
    found = [name for name in files if (output_dir / name).is_file()]
    if not found:
        return None
    saved = time.strftime("%Y-%m-%d %H:%M", time.localtime((output_dir / found[0]).stat().st_mtime))
    return f"{output_dir} already holds a finished run (saved {saved})"


def announce_overwrite(state, training_args) -> None:
    """Say out loud when this run is about to replace a finished run's saved student (resuming is not replacing)."""
    if not state.is_main_process or _resume_requested(training_args):
        return
    found = finished_run(training_args.output_dir, _FINISHED_RUN_FILES)
    if found:
        print(
            f"[trl-eopd] warning: {found}; this run will overwrite it. Pass `--output_dir` elsewhere to keep it, or "
            "`--resume_from_checkpoint true` to continue it.",
            file=sys.stderr,
            flush=True,
        )


def _resume_requested(training_args) -> bool:
    value = training_args.resume_from_checkpoint
    return value not in (None, "") and str(value).lower() not in ("false", "none")
