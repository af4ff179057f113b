"""Command line and YAML recipe of `trl-eopd train` into (script, training, model) arguments, with did-you-mean errors.

TRL's `TrlParser` reads the recipe (`--config`) and the flags; this module checks them first, so that a misspelled
recipe name, recipe key or flag is named with its closest valid spelling, in one line, before anything heavy runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError
from .recipes import recipe_path

PROG = "trl-eopd train"


def valid_keys(parser) -> list[str]:
    """Every option name (as a recipe key) of a `TrlParser` over dataclasses."""
    return sorted({f.name for cls in parser.dataclass_types for f in dataclasses.fields(cls) if f.init})


def unknown_key_error(keys: list[str], valid: list[str], where: str) -> UsageError:
    lines = []
    for key in keys:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        lines.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return UsageError(f"unknown {where}: {', '.join(lines)}. Run `{PROG} --help` for the valid options.")


def extract_config(argv: list[str]) -> tuple[list[str], Path | None]:
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


def load_recipe(path: Path, valid: list[str]) -> dict[str, Any]:
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
        raise unknown_key_error(unknown, valid, f"key(s) in recipe {path}")
    return recipe


def parse_args(parser, argv: list[str] | None = None):
    """Parse argv (and its `--config` recipe) with `parser` into its dataclasses, naming unknown keys and flags."""
    from .cpu_deepspeed import check_launcher_precision, needs_gloo
    from .quiet import deepspeed_set_up_quietly, uses_deepspeed

    argv = list(sys.argv[1:] if argv is None else argv)
    valid = valid_keys(parser)
    argv, config = extract_config(argv)
    recipe = load_recipe(config, valid) if config is not None else {}
    if config is not None:
        argv = ["--config", str(config), *argv]
    if needs_gloo(argv, recipe):
        argv += ["--ddp_backend", "gloo"]
    try:
        # Parsing the training arguments sets up the process group, and with it DeepSpeed's torch backend.
        with deepspeed_set_up_quietly(uses_deepspeed(argv, recipe)):
            *parsed, remaining = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except ValueError as e:
        # Validation errors from EOPDConfig / TrainingArguments __post_init__ (e.g. an invalid estimator combination).
        raise UsageError(str(e)) from None
    # TrlParser would reject them with a bare list; naming each with its closest valid option is kinder.
    unknown_flags = [arg[2:].split("=", 1)[0] for arg in remaining if arg.startswith("--")]
    if unknown_flags:
        raise unknown_key_error(unknown_flags, valid, "command-line option(s)")
    if remaining:
        raise UsageError(f"unexpected argument(s): {' '.join(remaining)}. Options are given as `--name value`.")
    check_launcher_precision(parsed[1])
    return tuple(parsed)


def is_main_process() -> bool:
    # Read from the launcher's environment, so that it also works before (or without) a process group.
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
