"""Train a student with EOPD from a YAML recipe: the script behind `trl-eopd train` and `scripts/eopd.py`.

It follows the layout of TRL's GKD example script (one parser over script, training and model arguments, `--config`
for a YAML recipe) and runs the same way on one process or under `accelerate launch`:

    trl-eopd train --config tiny-cpu                      # packaged recipe, tiny local models, CPU, seconds
    accelerate launch --config_file zero3.yaml --num_processes 8 -m trl_eopd.train --config qwen3-1.7b-math-eopd
    trl-eopd launch --accelerate_config zero3 --num_processes 8 --config qwen3-1.7b-math-eopd

Every check that can fail on user input (recipe keys, dataset columns, teacher/student vocabularies, checkpoint and
config paths) runs before any model weights are loaded, so a typo costs seconds, not a model download.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._paths import missing_local_path
from ._recipes import accelerate_config_path, list_accelerate_configs, list_recipes, recipe_path

PROG = "trl-eopd train"

# `tiny://student`, `tiny://teacher` and `tiny://train` name the download-free models and dataset of `trl_eopd.tiny`,
# built on first use. A scheme (rather than a bare word) cannot be mistaken for a hub id or a relative path.
TINY_SCHEME = "tiny://"
TINY_KEYS = ("student", "teacher", "train")

_LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class UsageError(Exception):
    """Bad user input, reported as one clear line before any model is loaded."""


@dataclass
class EOPDScriptArguments:
    """Dataset and script options of `trl-eopd train` (the training options are [`EOPDConfig`]'s)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, local dataset folder, or local .json/.jsonl/.parquet/.csv file, or `tiny://train`."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration (subset) name."})
    dataset_train_split: str = field(
        default="train", metadata={"help": "Split to train on (local files have a single `train` split)."}
    )
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split of `dataset_name` to evaluate on when `eval_strategy` is not `no` and no "
                  "`eval_dataset_name` is given."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Separate evaluation data: hub id, folder or local file. Defaults to `dataset_name`."},
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
        metadata={"help": "Template for string prompts; `{prompt}` is replaced by the prompt text (other braces, "
                  "e.g. `\\boxed{}`, are kept as is)."},
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
    save_verification_artifacts: bool = field(
        default=False,
        metadata={
            "help": "After saving, write `probe_logits.pt` (the trained student's logits on a fixed input, from rank "
            "0) and `log_history_rank{N}.json` (every process) to `output_dir`, so that a reload and the logged "
            "metrics of a distributed run can be checked. Used by the tests."
        },
    )


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------


def make_parser(prog: str = PROG):
    from trl import ModelConfig, TrlParser

    from .config import EOPDConfig

    recipes = ", ".join(list_recipes()) or "(none)"
    parser = TrlParser(
        (EOPDScriptArguments, EOPDConfig, ModelConfig),
        prog=prog,
        description="Entropy-Aware On-Policy Distillation (EOPD) of a student from a teacher. Every option can be "
        "set in a YAML recipe passed with `--config`; command-line flags override the recipe.",
        epilog=f"--config takes a YAML file or the name of a packaged recipe: {recipes}. "
        f"Packaged accelerate configs for `trl-eopd launch --accelerate_config`: {', '.join(list_accelerate_configs())}. "
        "`tiny://student`, `tiny://teacher` and `tiny://train` name tiny local models and data built on first use "
        "(no download).",
        usage=f"{prog} [-h] [--config RECIPE] [--OPTION VALUE ...]",
    )
    _group_options(parser, EOPDConfig, EOPDScriptArguments, ModelConfig)
    return parser


def _group_options(parser, config_cls, script_cls, model_cls) -> None:
    """Show EOPD's own options first and the hundreds inherited from TRL and transformers last.

    The parser lists fields in dataclass order, which puts EOPD's few fields after every TrainingArguments field.
    """
    import dataclasses

    from trl.experimental.gkd import GKDConfig
    from trl.trainer.sft_config import SFTConfig

    def names(cls, minus=()):
        excluded = {f.name for base in minus for f in dataclasses.fields(base)}
        return {f.name for f in dataclasses.fields(cls)} - excluded

    sections = [
        ("EOPD options (EOPDConfig's own fields)", names(config_cls, minus=(GKDConfig,))),
        ("distillation options (inherited from TRL's GKDConfig)", names(GKDConfig, minus=(SFTConfig,))),
        ("data and script options", names(script_cls)),
        ("model options (TRL's ModelConfig)", names(model_cls)),
        ("training options (TRL's SFTConfig and transformers' TrainingArguments)", None),
    ]
    groups = [(parser.add_argument_group(title), members) for title, members in sections]
    for action in list(parser._actions):
        if action.dest in (argparse.SUPPRESS, "help") or not action.option_strings:
            continue
        target = next(group for group, members in groups if members is None or action.dest in members)
        for container in parser._action_groups:
            if action in container._group_actions and container is not target:
                container._group_actions.remove(action)
        target._group_actions.append(action)
    # argparse prints groups in creation order: put the new ones right after the `options` group holding --help.
    new_groups = [group for group, _ in groups]
    rest = [g for g in parser._action_groups if g not in new_groups]
    parser._action_groups[:] = rest + new_groups


def _valid_keys(parser) -> list[str]:
    return sorted({a.dest for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")})


def _unknown_key_error(keys: list[str], valid: list[str], where: str) -> UsageError:
    lines = []
    for key in keys:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        lines.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return UsageError(f"unknown {where}: {', '.join(lines)}. Run `{PROG} --help` for the valid options.")


def _extract_config(argv: list[str]) -> tuple[list[str], Path | None]:
    """Pull `--config X` / `--config=X` out of argv and resolve X to a file (packaged recipe names allowed)."""
    out, config = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise UsageError("--config needs a value: a YAML file or a packaged recipe name.")
                value, i = argv[i + 1], i + 2
            else:
                value, i = arg.split("=", 1)[1], i + 1
            try:
                config = recipe_path(value)
            except FileNotFoundError as e:
                raise UsageError(str(e)) from None
            continue
        out.append(arg)
        i += 1
    return out, config


def _load_recipe(path: Path, valid: list[str]) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {path} must be a YAML mapping of option: value, got {type(recipe).__name__}.")
    # `env` is TrlParser's own key: environment variables to set before training.
    unknown = [k for k in recipe if k not in valid and k != "env"]
    if unknown:
        raise _unknown_key_error(unknown, valid, f"key(s) in recipe {path}")
    return recipe


def _needs_gloo(argv: list[str], recipe: dict) -> bool:
    """Whether this is a DeepSpeed launch on a machine without accelerators and no process-group backend was chosen.

    accelerate's DeepSpeed path only picks a backend for accelerator devices. On a CPU-only machine it leaves none,
    and every process then believes it is alone (world size 1) while DeepSpeed sees them all, which breaks its batch
    size check and silently feeds every rank the same data. DeepSpeed's own CPU backend is gloo. The training
    arguments set up the process group while they are parsed, so the default has to be injected before parsing.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or "LOCAL_RANK" not in os.environ:
        return False
    if "ddp_backend" in recipe or any(a.split("=", 1)[0] in ("--ddp_backend", "--ddp-backend") for a in argv):
        return False
    import torch

    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def parse_args(argv: list[str] | None = None):
    """Parse argv (and the `--config` recipe) into (script_args, training_args, model_args), validating keys."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    valid = _valid_keys(parser)
    argv, config = _extract_config(argv)
    recipe = _load_recipe(config, valid) if config is not None else {}
    if config is not None:
        argv = ["--config", str(config), *argv]
    if _needs_gloo(argv, recipe):
        argv += ["--ddp_backend", "gloo"]
    # TrlParser raises a bare ValueError listing unknown keys; checking first lets us name them and suggest fixes.
    option_strings = {s for a in parser._actions for s in a.option_strings}
    unknown_flags = []
    for arg in argv:
        if arg.startswith("--") and arg != "--config" and arg.split("=", 1)[0] not in option_strings:
            unknown_flags.append(arg[2:].split("=", 1)[0])
    if unknown_flags and not any(a in ("-h", "--help") for a in argv):
        raise _unknown_key_error(unknown_flags, valid, "command-line option(s)")
    from ._quiet import harmless_prints_dropped

    try:
        # Parsing the training arguments sets up the process group, where DeepSpeed prints from every rank.
        with harmless_prints_dropped():
            script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as e:
        # Validation errors from EOPDConfig / TrainingArguments __post_init__ (e.g. an invalid estimator combination).
        raise UsageError(str(e)) from None
    check_launcher_precision(training_args)
    return script_args, training_args, model_args


def check_launcher_precision(training_args) -> None:
    """Stop with one line when `accelerate launch` asked DeepSpeed for mixed precision that the recipe turned off.

    The packaged accelerate configs say `mixed_precision: bf16` (GPU training), and a CPU recipe says `bf16: false`;
    left alone, transformers finds the mismatch only after both models are built and every rank prints a traceback.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed in ("bf16", "fp16") and not getattr(training_args, mixed):
        raise UsageError(
            f"the accelerate config asks DeepSpeed for {mixed} mixed precision but the training arguments have "
            f"`{mixed}: false`. Pass `--mixed_precision no` to `accelerate launch` (as on CPU), or set "
            f"`{mixed}: true` in the recipe. `trl-eopd launch` passes `--mixed_precision no` by itself when no GPU is visible."
        )


# --------------------------------------------------------------------------------------------------------------------
# Tiny local models (`tiny://...`)
# --------------------------------------------------------------------------------------------------------------------


def tiny_dir() -> Path:
    # Versioned: the cache is built once, so a change to the tiny models needs a new folder (v2: the student's
    # attention heads became 32 wide, for vLLM's CPU engine).
    return Path(os.environ.get("TRL_EOPD_TINY_DIR", Path.home() / ".cache" / "trl_eopd" / "tiny-v2"))


def ensure_tiny_setup() -> dict[str, str]:
    """Build the tiny models and dataset once; safe when several processes (or nodes) race to do it."""
    from .tiny import save_tiny_setup

    root = tiny_dir()
    paths = {"student": str(root / "student"), "teacher": str(root / "teacher"), "train": str(root / "train.jsonl")}
    if (root / "COMPLETE").exists():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    # Each process builds into its own folder and renames it into place; the build is deterministic, so whichever
    # rename wins, every process sees identical files, and nobody ever reads a half-written one.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        built = save_tiny_setup(tmp)
        (tmp / "COMPLETE").write_text(json.dumps(built))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def resolve_tiny(name: str | None) -> str | None:
    if name is None or not name.startswith(TINY_SCHEME):
        return name
    key = name[len(TINY_SCHEME):]
    if key not in TINY_KEYS:
        raise UsageError(f"unknown tiny asset {name!r}; use one of {', '.join(TINY_SCHEME + k for k in TINY_KEYS)}.")
    return ensure_tiny_setup()[key]


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def load_split(name: str, config: str | None, split: str | None, *, trust_remote_code: bool = False):
    """One split of a hub dataset, a local dataset folder (`save_to_disk` or data files) or a local data file."""
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        builder = _LOCAL_DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(
                f"cannot read dataset file {name}: use one of {', '.join(sorted(_LOCAL_DATA_BUILDERS))}."
            )
        # A local file has one split, whatever the recipe calls it.
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UsageError(f"dataset {name} has no split {split!r}; it has {', '.join(loaded)}.")
            return loaded[split]
        return loaded
    if not path.exists() and (name.startswith((".", "/", "~")) or path.suffix.lower() in _LOCAL_DATA_BUILDERS):
        raise UsageError(f"dataset file {name} does not exist.")
    try:
        return datasets.load_dataset(name, config, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UsageError(f"dataset {name} has no split {split!r}: {e}") from None
        raise


def _is_turns(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, dict) and "role" in t and "content" in t for t in value)


def _check_column(column: str, columns: list[str], option: str, name: str) -> None:
    if column not in columns:
        close = difflib.get_close_matches(column, columns, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(
            f"dataset {name} has no column {column!r} (set by {option}).{hint} Its columns are: {', '.join(columns)}."
        )


def to_messages(dataset, args: EOPDScriptArguments, name: str, *, lmbda: float):
    """Bring a dataset to the single `messages` column GKD's collator reads, validating its columns.

    Other columns are dropped on purpose: GKD's collator treats a `prompt` column as an already formatted prompt
    string, which would silently bypass the chat template.
    """
    columns = list(dataset.column_names)
    use_messages = args.dataset_prompt_column is None and args.dataset_messages_column in columns
    if use_messages:
        source = ("messages", args.dataset_messages_column, None)
    else:
        prompt_col = args.dataset_prompt_column or "prompt"
        if prompt_col not in columns:
            if args.dataset_prompt_column is not None:
                _check_column(prompt_col, columns, "dataset_prompt_column", name)
            raise UsageError(
                f"dataset {name} has neither a {args.dataset_messages_column!r} column (chat turns ending with the "
                f"assistant's) nor a 'prompt' column; its columns are: {', '.join(columns)}. Point "
                "`dataset_messages_column` or `dataset_prompt_column` (and optionally `dataset_completion_column`) at "
                "the right ones, e.g. `dataset_prompt_column: problem` and `dataset_completion_column: solution` for "
                "MATH."
            )
        completion_col = args.dataset_completion_column
        if completion_col is not None:
            _check_column(completion_col, columns, "dataset_completion_column", name)
        elif "completion" in columns:
            completion_col = "completion"
        source = ("prompt", prompt_col, completion_col)

    prompt_only = source[0] == "prompt" and source[2] is None
    if prompt_only and lmbda < 1.0:
        raise UsageError(
            f"dataset {name} has prompts but no completions, so every batch must be generated by the student: set "
            f"`lmbda: 1.0` (got {lmbda}), or name a completion column with `dataset_completion_column`."
        )
    template, system = args.prompt_template, args.system_prompt

    def as_turns(value, role: str, column: str) -> list[dict]:
        if isinstance(value, str):
            if role == "user":
                value = template.replace("{prompt}", value)
            return [{"role": role, "content": value}]
        if _is_turns(value):
            return [{"role": t["role"], "content": t["content"]} for t in value]
        raise UsageError(
            f"column {column!r} of dataset {name} must hold strings or lists of {{role, content}} turns; got "
            f"{type(value).__name__}."
        )

    def convert(row):
        if source[0] == "messages":
            turns = as_turns(row[source[1]], "user", source[1])
            if not turns:
                raise UsageError(f"dataset {name} has an empty conversation in column {source[1]!r}.")
        else:
            turns = as_turns(row[source[1]], "user", source[1])
            if source[2] is not None:
                turns += as_turns(row[source[2]], "assistant", source[2])
        if turns[-1]["role"] != "assistant":
            # Prompt-only conversation: GKD's collator takes everything but the last turn as the prompt, so give it an
            # empty assistant turn; with lmbda = 1 the student's own sample replaces it before any loss is taken.
            if lmbda < 1.0:
                raise UsageError(
                    f"a conversation in dataset {name} does not end with an assistant turn, which is only allowed with "
                    f"`lmbda: 1.0` (got {lmbda})."
                )
            turns.append({"role": "assistant", "content": ""})
        if system is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
        return {"messages": turns}

    # Fail on a bad first row now, with a clear message, rather than deep inside a worker during `map`.
    if len(dataset) > 0:
        convert(dataset[0])
    return dataset.map(convert, remove_columns=columns, desc=f"Formatting {name}")


def load_datasets(script_args: EOPDScriptArguments, training_args):
    if not script_args.dataset_name:
        raise UsageError("no training data: set `dataset_name` (hub id, local folder or file, or `tiny://train`).")
    name = resolve_tiny(script_args.dataset_name)
    train = load_split(name, script_args.dataset_config, script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if len(train) == 0:
        raise UsageError(f"dataset {script_args.dataset_name} has no rows to train on (check the split and filters).")
    train = to_messages(train, script_args, script_args.dataset_name, lmbda=training_args.lmbda)

    eval_dataset = None
    wants_eval = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    if script_args.eval_dataset_name is not None:
        eval_name = resolve_tiny(script_args.eval_dataset_name)
        is_file = Path(eval_name).expanduser().is_file()
        split = script_args.eval_dataset_split or ("train" if is_file else "test")
        eval_dataset = load_split(eval_name, script_args.eval_dataset_config, split)
        eval_label = script_args.eval_dataset_name
    elif wants_eval:
        if Path(name).expanduser().is_file():
            raise UsageError(
                f"`eval_strategy` is {training_args.eval_strategy!r} but the training data is a single file; give the "
                "evaluation data with `eval_dataset_name`."
            )
        eval_dataset = load_split(name, script_args.dataset_config, script_args.dataset_test_split)
        eval_label = f"{script_args.dataset_name}[{script_args.dataset_test_split}]"
    if eval_dataset is not None:
        if script_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))
        eval_dataset = to_messages(eval_dataset, script_args, eval_label, lmbda=training_args.lmbda)
    return train, eval_dataset


# --------------------------------------------------------------------------------------------------------------------
# Models and tokenizer (configs only: no weights are loaded here)
# --------------------------------------------------------------------------------------------------------------------


def check_vocabularies(student: str, teacher: str, *, model_args, training_args) -> None:
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


def apply_chat_template_kwargs(tokenizer, kwargs: dict | None) -> None:
    """Fix template variables (e.g. `enable_thinking=False`) by setting them at the top of the chat template.

    GKD's collator calls `apply_chat_template` without extra arguments, so the variables have to live in the template
    itself; a top-level Jinja `set` takes precedence over the (absent) render-time variable.
    """
    if not kwargs:
        return
    if not tokenizer.chat_template:
        raise UsageError("`chat_template_kwargs` is set but the tokenizer has no chat template.")
    prefix = "".join(f"{{%- set {key} = {json.dumps(value)} %}}" for key, value in kwargs.items())
    tokenizer.chat_template = prefix + tokenizer.chat_template


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


def _resume_target(training_args) -> str | bool | None:
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


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


def _is_main_process() -> bool:
    # Read from the launcher's environment, so that it also works before (or without) a process group.
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _log_rank(state, message: str) -> None:
    # Only rank 0 speaks: every rank would print the same line. Each rank's own log history (see
    # `save_verification_artifacts`) is what shows that all of them trained.
    if state.is_main_process:
        print(f"[trl-eopd] {message}", file=sys.stderr, flush=True)


_FINISHED_RUN_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "training_args.bin")


def _announce_overwrite(state, training_args) -> None:
    """Say out loud when this run is about to replace a finished run's saved student (resuming is not replacing)."""
    if not state.is_main_process or _resume_requested(training_args):
        return
    output_dir = Path(training_args.output_dir)
    found = [name for name in _FINISHED_RUN_FILES if (output_dir / name).is_file()]
    if found:
        import time

        saved = time.strftime("%Y-%m-%d %H:%M", time.localtime((output_dir / found[0]).stat().st_mtime))
        print(
            f"[trl-eopd] warning: {output_dir} already holds a finished run (saved {saved}); this run will overwrite "
            "it. Pass `--output_dir` elsewhere to keep it, or `--resume_from_checkpoint true` to continue it.",
            file=sys.stderr,
            flush=True,
        )


def _resume_requested(training_args) -> bool:
    value = training_args.resume_from_checkpoint
    return value not in (None, "") and str(value).lower() not in ("false", "none")


def _activation_checkpointing(training_args) -> bool:
    # transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing`; reading the old name warns.
    if hasattr(training_args, "activation_checkpointing"):
        return bool(training_args.activation_checkpointing)
    return bool(training_args.gradient_checkpointing)


def _save_verification_artifacts(trainer, tokenizer, output_dir: str) -> None:
    import torch

    state = trainer.accelerator.state
    with open(os.path.join(output_dir, f"log_history_rank{state.process_index}.json"), "w") as f:
        json.dump(trainer.state.log_history, f)

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    vocab = trainer.model.config.get_text_config().vocab_size
    probe = (torch.arange(16, dtype=torch.long).unsqueeze(0) * 7 + 3) % vocab
    model.eval()
    # Every rank runs the forward: under ZeRO-3 it gathers each layer's shards collectively.
    with torch.no_grad():
        logits = model(input_ids=probe.to(trainer.accelerator.device)).logits.float().cpu()
    if trainer.accelerator.is_main_process:
        torch.save({"input_ids": probe, "logits": logits}, os.path.join(output_dir, "probe_logits.pt"))
    trainer.accelerator.wait_for_everyone()


def run(script_args: EOPDScriptArguments, training_args, model_args) -> None:
    """Validate everything that can be validated cheaply, then build the trainer, train, evaluate and save."""
    from accelerate import PartialState

    if isinstance(script_args.chat_template_kwargs, str):
        try:
            script_args.chat_template_kwargs = json.loads(script_args.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise UsageError(f"`chat_template_kwargs` is not valid JSON: {e}") from None
    if not model_args.model_name_or_path:
        raise UsageError("no student: set `model_name_or_path` (hub id, local folder or `tiny://student`).")
    if not training_args.teacher_model_name_or_path:
        raise UsageError("no teacher: set `teacher_model_name_or_path` (hub id, local folder or `tiny://teacher`).")

    state = PartialState()
    _log_rank(state, f"{state.num_processes} process(es), device={state.device}, "
                     f"distributed_type={state.distributed_type.value}")
    _announce_overwrite(state, training_args)

    student = resolve_tiny(model_args.model_name_or_path)
    teacher = resolve_tiny(training_args.teacher_model_name_or_path)
    check_vocabularies(student, teacher, model_args=model_args, training_args=training_args)
    resume = _resume_target(training_args)
    tokenizer = load_tokenizer(
        resolve_tiny(script_args.tokenizer_name_or_path) or student,
        model_args=model_args,
        training_args=training_args,
        script_args=script_args,
    )
    train_dataset, eval_dataset = load_datasets(script_args, training_args)

    from trl import get_peft_config, get_quantization_config

    from ._quiet import harmless_warnings_silenced
    from .trainer import EOPDTrainer

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

    with harmless_warnings_silenced():
        trainer = EOPDTrainer(
            model=student,
            teacher_model=teacher,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
        )
        _log_rank(state, f"training {student} from teacher {teacher} on {len(train_dataset)} rows")
        trainer.train(resume_from_checkpoint=resume)

        if eval_dataset is not None:
            metrics = trainer.evaluate()
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)

        trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
    trainer.accelerator.wait_for_everyone()
    _log_rank(state, f"saved the student to {training_args.output_dir}")

    if script_args.save_verification_artifacts:
        with harmless_warnings_silenced():
            _save_verification_artifacts(trainer, tokenizer, training_args.output_dir)

    if hasattr(trainer, "end"):
        trainer.end()


def main(argv: list[str] | None = None) -> int:
    """`trl-eopd train`: parse the recipe and flags, then train. Returns 0, or exits with status 2 on bad input."""
    from ._quiet import tell_deepspeed_when_cpu_only

    tell_deepspeed_when_cpu_only()
    try:
        script_args, training_args, model_args = parse_args(argv)
        run(script_args, training_args, model_args)
    except UsageError as e:
        # Under a launcher every rank finds the same problem; one copy of the message is enough.
        if _is_main_process():
            print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


# Flags that belong to `accelerate launch` rather than to the training script (True: the flag takes a value).
_LAUNCH_FLAGS = {
    "--num_processes": True, "--num_machines": True, "--machine_rank": True, "--main_process_ip": True,
    "--main_process_port": True, "--mixed_precision": True, "--gpu_ids": True, "--rdzv_backend": True,
    "--cpu": False, "--same_network": False,
}

LAUNCH_HELP = f"""\
usage: trl-eopd launch --accelerate_config NAME|PATH [accelerate flags] --config RECIPE [training flags]

Run `accelerate launch` on `trl-eopd train` with a packaged (or your own) accelerate config. The accelerate flags
below go to `accelerate launch`; every other flag goes to `trl-eopd train` (see `trl-eopd train --help`).

options:
  -h, --help            show this help message and exit
  --accelerate_config NAME|PATH
                        accelerate config: a YAML file or a packaged name: {", ".join(list_accelerate_configs())}

accelerate flags (passed to `accelerate launch`):
  --num_processes N     processes in all (one per GPU, times --num_machines)
  --num_machines N      nodes taking part
  --machine_rank N      rank of this node (0 .. num_machines - 1)
  --main_process_ip IP  address of the node with machine_rank 0
  --main_process_port PORT
                        port on that node
  --mixed_precision {{no,bf16,fp16}}
                        overrides the config's (bf16 in the packaged ones). Without a visible GPU, `trl-eopd launch`
                        passes `no` by itself: DeepSpeed on CPU trains in float32
  --gpu_ids IDS, --rdzv_backend NAME, --same_network
                        as for `accelerate launch`
  --cpu                 accelerate's single-process CPU launcher; it turns DeepSpeed off, so do not pass it to run the
                        DeepSpeed configs on CPU (they use DeepSpeed's CPU backend by themselves)

examples:
  trl-eopd launch --accelerate_config zero3 --num_processes 2 --config tiny-cpu     # CPU check, no download
  trl-eopd launch --accelerate_config zero3 --num_processes 8 --config qwen3-4b-dapo-eopd \\
      --gradient_accumulation_steps 8
"""


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def plan_launch(argv: list[str], *, gpu: bool | None = None) -> tuple[list[str], list[str]]:
    """The `accelerate launch` command line for `trl-eopd launch`, and notes for the user about what was added."""
    parser = argparse.ArgumentParser(prog="trl-eopd launch", add_help=False)
    parser.add_argument("--accelerate_config", "--accelerate-config", default=None)
    known, rest = parser.parse_known_args(argv)
    launch_args: list[str] = []
    config_file = None
    if known.accelerate_config is not None:
        try:
            config_file = accelerate_config_path(known.accelerate_config)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        launch_args += ["--config_file", str(config_file)]
    train_args: list[str] = []
    i = 0
    while i < len(rest):
        flag = rest[i].split("=", 1)[0].replace("-", "_").replace("__", "--", 1)
        if flag in _LAUNCH_FLAGS:
            takes_value = _LAUNCH_FLAGS[flag] and "=" not in rest[i]
            launch_args += rest[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            train_args.append(rest[i])
            i += 1
    notes = []
    given = {a.split("=", 1)[0].replace("-", "_").replace("__", "--", 1) for a in launch_args}
    if config_file is not None and "--mixed_precision" not in given and "--cpu" not in given:
        wanted = _config_mixed_precision(config_file)
        if wanted not in (None, "no") and not (_has_gpu() if gpu is None else gpu):
            # bf16/fp16 mixed precision is a GPU setting; DeepSpeed on CPU trains in float32.
            launch_args += ["--mixed_precision", "no"]
            notes.append(f"no GPU visible: passing `--mixed_precision no` (the config asks for {wanted}); "
                         "training runs in float32 on CPU.")
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "trl_eopd.train", *train_args]
    return command, notes


def _config_mixed_precision(path: Path) -> str | None:
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None  # accelerate reports an unreadable config itself
    value = config.get("mixed_precision") if isinstance(config, dict) else None
    return None if value is None else str(value).lower()


def build_launch_command(argv: list[str]) -> list[str]:
    """The `accelerate launch` command line for `trl-eopd launch` (see [`launch_main`])."""
    return plan_launch(argv)[0]


def launch_main(argv: list[str] | None = None) -> int:
    """`trl-eopd launch --accelerate_config NAME|PATH [accelerate flags] [training flags]`.

    `NAME` is a packaged config (zero2, zero3, zero3_offload, multi_gpu); accelerate's own flags (`--num_processes`,
    `--num_machines`, `--machine_rank`, `--main_process_ip`, `--main_process_port`, `--mixed_precision`, `--cpu`) go to
    `accelerate launch`, everything else to `trl-eopd train`.
    """
    import subprocess

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(LAUNCH_HELP, end="")
        return 0
    try:
        command, notes = plan_launch(argv)
        # Resolve the recipe here too, so a bad recipe name fails before accelerate spawns anything.
        _extract_config(command[command.index("trl_eopd.train") + 1 :])
    except UsageError as e:
        print(f"trl-eopd launch: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from ._quiet import tell_deepspeed_when_cpu_only

    env = dict(os.environ)
    tell_deepspeed_when_cpu_only(env)
    for note in notes:
        print(f"[trl-eopd] {note}", file=sys.stderr, flush=True)
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
