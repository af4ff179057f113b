"""The `trl-eopd train` script: `make_parser` and `main(script_args, training_args, model_args)`, as TRL's scripts.

One process:         trl-eopd train --config tiny-cpu
Several processes:   accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 8 \\
                         scripts/eopd.py --config recipes/qwen3-4b-dapo-eopd.yaml

(`scripts/eopd.py` is this module as a file; `python -m trl_eopd.cli.train` runs it too.) Every check that can fail on
user input (recipe keys, dataset columns, teacher/student vocabularies, checkpoint and config paths) runs before any
model weights are loaded, so a typo costs seconds, not a model download.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from .errors import UsageError, exit_with_error
from .parsing import PROG, is_main_process
from .parsing import parse_args as _parse_with_checks
from .recipes import list_accelerate_configs, list_recipes
from .script_arguments import EOPDScriptArguments

__all__ = ["EOPDScriptArguments", "UsageError", "cli_main", "main", "make_parser", "parse_args"]


def make_parser(prog: str = PROG):
    """The `TrlParser` of `trl-eopd train`: script, EOPD and model arguments, EOPD's own options listed first."""
    from trl import ModelConfig, TrlParser
    from trl.trainer.sft_config import SFTConfig

    from .._compat import regroup_help
    from .._gkd import GKDConfig
    from ..config import EOPDConfig

    parser = TrlParser(
        (EOPDScriptArguments, EOPDConfig, ModelConfig),
        prog=prog,
        description="Entropy-Aware On-Policy Distillation (EOPD) of a student from a teacher. Every option can be "
        "set in a YAML recipe passed with `--config`; command-line flags override the recipe.",
        epilog="--config takes a YAML file or the name of a packaged recipe: "
        f"{', '.join(list_recipes()) or '(none)'}. "
        "`tiny://student`, `tiny://teacher` and `tiny://train` name tiny local models and data built on first use "
        "(no download). Several processes: `accelerate launch --config_file recipes/accelerate/NAME.yaml "
        f"scripts/eopd.py --config RECIPE`, NAME one of {', '.join(list_accelerate_configs())}.",
        usage=f"{prog} [-h] [--config RECIPE] [--OPTION VALUE ...]",
        # Unknown (or abbreviated) flags come back unparsed, to be named with their closest valid spelling.
        allow_abbrev=False,
    )

    def names(cls, minus=()):
        excluded = {f.name for base in minus for f in dataclasses.fields(base)}
        return {f.name for f in dataclasses.fields(cls)} - excluded

    regroup_help(
        parser,
        [
            ("EOPD options (EOPDConfig's own fields)", names(EOPDConfig, minus=(GKDConfig,))),
            ("distillation options (inherited from TRL's GKDConfig)", names(GKDConfig, minus=(SFTConfig,))),
            ("data and script options", names(EOPDScriptArguments)),
            ("model options (TRL's ModelConfig)", names(ModelConfig)),
            ("training options (TRL's SFTConfig and transformers' TrainingArguments)", None),
        ],
    )
    return parser


def parse_args(argv: list[str] | None = None):
    """(script_args, training_args, model_args) from argv and its `--config` recipe; bad input raises `UsageError`."""
    return _parse_with_checks(make_parser(), argv)


def _log(state, message: str) -> None:
    # Only rank 0 speaks: every rank would print the same line.
    if state.is_main_process:
        print(f"[trl-eopd] {message}", file=sys.stderr, flush=True)


def _activation_checkpointing(training_args) -> bool:
    # transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing`; reading the old name warns.
    if hasattr(training_args, "activation_checkpointing"):
        return bool(training_args.activation_checkpointing)
    return bool(training_args.gradient_checkpointing)


def main(script_args: EOPDScriptArguments, training_args, model_args, callbacks=None) -> None:
    """Validate everything that can be validated cheaply, then build the trainer, train, evaluate and save.

    `callbacks` are handed to the trainer, as `Trainer(callbacks=...)` takes them.
    """
    from accelerate import PartialState

    from ..launch_check import launch_problem
    from .data import load_datasets
    from .preflight import announce_overwrite, check_prompt_lengths, check_vocabularies, resume_target
    from .tiny_cache import resolve_tiny
    from .tokenizer_setup import load_tokenizer

    if isinstance(script_args.chat_template_kwargs, str):
        try:
            script_args.chat_template_kwargs = json.loads(script_args.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise UsageError(f"`chat_template_kwargs` is not valid JSON: {e}") from None
    if script_args.ignore_bias_buffers:
        raise UsageError("`ignore_bias_buffers` (a DDP workaround of some TRL scripts) is not supported here.")
    if not model_args.model_name_or_path:
        raise UsageError("no student: set `model_name_or_path` (hub id, local folder or `tiny://student`).")
    if not training_args.teacher_model_name_or_path and not training_args.teacher_model_server_url:
        raise UsageError(
            "no teacher: set `teacher_model_name_or_path` (hub id, local folder or `tiny://teacher`), "
            "or `teacher_model_server_url` for a teacher served by vLLM."
        )

    state = PartialState()
    launch_error = launch_problem(state)
    if launch_error is not None:
        raise UsageError(launch_error)
    announce_overwrite(state, training_args)

    student = resolve_tiny(model_args.model_name_or_path)
    teacher = resolve_tiny(training_args.teacher_model_name_or_path)
    if teacher is not None:  # a served teacher's vocabulary is checked against the server by the trainer
        check_vocabularies(student, teacher, model_args=model_args, training_args=training_args)
    resume = resume_target(training_args)
    tokenizer = load_tokenizer(
        resolve_tiny(script_args.tokenizer_name_or_path) or student,
        model_args=model_args,
        training_args=training_args,
        script_args=script_args,
    )
    train_dataset, eval_dataset = load_datasets(script_args, training_args)
    check_prompt_lengths(
        tokenizer,
        training_args,
        {
            f"dataset {script_args.dataset_name}": train_dataset,
            f"evaluation dataset {script_args.eval_dataset_name or script_args.dataset_name}": eval_dataset,
        },
    )

    # Said once every check above has passed, so that bad input gets its one line alone.
    _log(
        state,
        f"{state.num_processes} process(es), device={state.device}, distributed_type={state.distributed_type.value}",
    )

    from trl import get_peft_config, get_quantization_config

    from ..trainer import EOPDTrainer

    quantization_config = get_quantization_config(model_args)
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        "use_cache": not _activation_checkpointing(training_args),
    }
    if quantization_config is not None:
        # k-bit weights cannot be moved after loading: place each process's copy on its own device right away.
        model_init_kwargs.update(device_map={"": state.local_process_index}, quantization_config=quantization_config)
    if training_args.model_init_kwargs:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    # The teacher is frozen and only generates logits: load it like the student unless the recipe says otherwise
    # (e.g. `teacher_model_init_kwargs: {dtype: bfloat16}`).
    teacher_init_kwargs = {
        "revision": None,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        "use_cache": True,
    }
    teacher_init_kwargs.update(training_args.teacher_model_init_kwargs or {})
    training_args.teacher_model_init_kwargs = teacher_init_kwargs
    training_args.teacher_model_name_or_path = teacher

    trainer = EOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    served = trainer._teacher_server
    source = f"teacher {teacher}" if served is None else f"the teacher(s) served at {served.url}"
    _log(state, f"training {student} from {source} on {len(train_dataset)} rows")
    trainer.train(resume_from_checkpoint=resume)

    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
    trainer.accelerator.wait_for_everyone()
    _log(state, f"saved the student to {training_args.output_dir}")

    if hasattr(trainer, "end"):
        trainer.end()


def cli_main(argv: list[str] | None = None) -> int:
    """`trl-eopd train`: parse the recipe and flags, then train. Returns 0, or exits with status 2 on bad input.

    A worker of `accelerate launch` or `torchrun` does not return: once the run is saved and its process group
    destroyed, it exits at once with status 0 (`process_exit.py` says why).
    """
    from .process_exit import exit_without_teardown, launched_worker
    from .quiet import tell_deepspeed_when_cpu_only

    tell_deepspeed_when_cpu_only()
    try:
        main(*parse_args(argv))
    except UsageError as e:
        # Under a launcher every rank finds the same problem; one copy of the message is enough.
        if is_main_process():
            exit_with_error(PROG, str(e))
        raise SystemExit(2) from None
    if launched_worker():
        exit_without_teardown(0)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
