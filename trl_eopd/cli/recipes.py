"""Find the recipes and accelerate configs shipped inside the package.

The files live in `trl_eopd/recipes/` (a data folder, matched by the `recipes/**/*` package-data glob in
pyproject.toml), so they exist in an installed package (`pip install .`, or a wheel built from a clone) as well as in
an editable install from a clone, where the top-level `recipes` folder is a symlink to them. This module is named
`_recipes` because a module and a data folder cannot share the name `recipes` inside one package.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

# The recipes are package data of `trl_eopd` (the repository's `recipes/` links to them).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
ACCELERATE_DIR = RECIPES_DIR / "accelerate"

_YAML_SUFFIXES = (".yaml", ".yml")


def _names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in _YAML_SUFFIXES and p.is_file())


def list_recipes() -> list[str]:
    """Names of the packaged training recipes (usable as `--config NAME`)."""
    return _names(RECIPES_DIR)


def list_accelerate_configs() -> list[str]:
    """Names of the packaged accelerate configs (usable as `--accelerate_config NAME`)."""
    return _names(ACCELERATE_DIR)


def _resolve(name_or_path: str | os.PathLike, folder: Path, available: list[str], what: str, flag: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    # A bare name (no directory part) may name a packaged file, with or without its suffix.
    name = str(name_or_path)
    # Not `Path.stem`: recipe names contain dots ("qwen3-1.7b-...") that are not suffixes.
    stem = name[: -len(path.suffix)] if path.suffix in _YAML_SUFFIXES else name
    if os.sep not in name and "/" not in name:
        for suffix in _YAML_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    close = difflib.get_close_matches(os.path.basename(stem), available, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise FileNotFoundError(
        f"{what} {name!r} (from {flag}) is neither an existing file nor a packaged name.{hint} "
        f"Packaged {what}s: {', '.join(available) or '(none)'} (in {folder})."
    )


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """Path of a training recipe: an existing YAML file, or the name of a packaged one (e.g. `"tiny-cpu"`)."""
    return _resolve(name_or_path, RECIPES_DIR, list_recipes(), "recipe", "--config")


def accelerate_config_path(name_or_path: str | os.PathLike) -> Path:
    """Path of an accelerate config: an existing file, or a packaged name (`zero2`, `zero3`, `zero3_offload`,
    `fsdp2`, `multi_gpu`)."""
    return _resolve(
        name_or_path, ACCELERATE_DIR, list_accelerate_configs(), "accelerate config", "--accelerate_config"
    )
