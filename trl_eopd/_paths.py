"""Telling a mistyped local model path from a Hub id, so the error can say that the path does not exist."""

from __future__ import annotations

import os


def missing_local_path(name_or_path: str) -> bool:
    """True when `name_or_path` can only be meant as a local path (it cannot be a Hub id) and nothing is there.

    Hub ids are `name` or `owner/name`; anything absolute, relative with `./`, `../` or `~`, or with more than one
    separator, is a path. Hugging Face Hub would otherwise answer such a string with a repo-id format error.
    """
    if os.path.exists(os.path.expanduser(name_or_path)):
        return False
    looks_local = (
        os.path.isabs(name_or_path)
        or name_or_path.startswith(("./", "../", "~", ".\\", "..\\"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
        or name_or_path.endswith("/")
    )
    return looks_local


def check_model_path(name_or_path, field: str) -> None:
    """Raise a `ValueError` naming `field` when it holds a local path that does not exist."""
    if isinstance(name_or_path, (str, os.PathLike)) and missing_local_path(os.fspath(name_or_path)):
        raise ValueError(
            f"`{field}` is {os.fspath(name_or_path)!r}, a local path that does not exist. Pass the folder a model was "
            "saved to with `save_pretrained`, or a Hub id such as 'Qwen/Qwen3-0.6B'."
        )
