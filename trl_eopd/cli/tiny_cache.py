"""The `tiny://` names (`tiny://student`, `tiny://teacher`, `tiny://train`): tiny local models and data, built once.

The models and data themselves come from `trl_eopd.tiny`; this module caches them on disk and resolves the names, for
`trl-eopd train` and `trl-eopd eval`. A scheme (rather than a bare word) cannot be mistaken for a hub id or a path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError

TINY_SCHEME = "tiny://"
TINY_KEYS = ("student", "teacher", "train")


def tiny_dir() -> Path:
    # Versioned: the cache is built once, so a change to the tiny models needs a new folder (v2: the student's
    # attention heads became 32 wide, for vLLM's CPU engine; v3: the teacher's too, so a vLLM server can host it).
    return Path(os.environ.get("TRL_EOPD_TINY_DIR", Path.home() / ".cache" / "trl_eopd" / "tiny-v3"))


def ensure_tiny_setup() -> dict[str, str]:
    """Build the tiny models and dataset once; safe when several processes (or nodes) race to do it."""
    import torch.distributed as dist

    root = tiny_dir()
    paths = {"student": str(root / "student"), "teacher": str(root / "teacher"), "train": str(root / "train.jsonl")}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        _build_once(root)
        return paths
    # Inside a launch, `save_pretrained` writes the weights from global rank 0 only, so another process's build would
    # be empty: rank 0 builds, the others wait. Every process calls this the same number of times with the same
    # names, so all of them reach the barrier.
    if dist.get_rank() == 0:
        _build_once(root)
    dist.barrier()
    if not (root / "COMPLETE").exists():
        raise UsageError(
            f"the tiny models were built by the first process in {root}, which this process (rank {dist.get_rank()}) "
            "cannot see: on several nodes, set TRL_EOPD_TINY_DIR to a folder all nodes share."
        )
    return paths


def _build_once(root: Path) -> None:
    from ..tiny import save_tiny_setup

    if (root / "COMPLETE").exists():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    # Each builder writes into its own folder and renames it into place; the build is deterministic, so whichever
    # rename wins, everyone sees identical files, and nobody ever reads a half-written one.
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


def resolve_tiny(name: str | None) -> str | None:
    """The local path behind a `tiny://` name (building it on first use); any other name is returned unchanged."""
    if name is None or not name.startswith(TINY_SCHEME):
        return name
    key = name[len(TINY_SCHEME) :]
    if key not in TINY_KEYS:
        raise UsageError(f"unknown tiny asset {name!r}; use one of {', '.join(TINY_SCHEME + k for k in TINY_KEYS)}.")
    return ensure_tiny_setup()[key]
