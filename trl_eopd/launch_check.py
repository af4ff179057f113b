"""Refuse launches whose processes would train apart, or under a sharding EOPD does not support, before models load.

A launcher (`accelerate launch`, `torchrun`) starts one process per device and tells each the world size. accelerate
then decides how the processes cooperate: DDP, DeepSpeed or FSDP, each of which synchronises gradients. Without a GPU
it takes none of these for an FSDP or multi-GPU config and reports `distributed_type=NO`, while the processes still
run. Each then trains its own copy of the student on the same data, divides its loss by its share of a token count
that is never shared, and writes to the same output folder: a silent wrong result. Found where it arises:

- an FSDP (or multi-GPU) accelerate config on a machine without GPUs: one process each, world size 1 each;
- `torchrun` without a backend on such a machine: the same;
- either of them with `--ddp_backend gloo`: the processes form a group (`num_processes` is 2), but with
  `distributed_type=NO` nothing wraps the model in DDP, so nothing averages the gradients.

FSDP1 is refused too, naming FSDP2: EOPD's loss reads the output layers' weights directly and handles FSDP2's sharded
tensors only (trl_eopd/loss/projection.py, `gathered`).
"""

from __future__ import annotations

import os

# The CPU launches that do synchronise gradients (docs/scaling.md, "Checking a distributed setup on CPU").
WORKING_CPU_LAUNCH = (
    "On CPU, launch DeepSpeed over gloo instead: `DS_ACCELERATOR=cpu accelerate launch --config_file "
    "recipes/accelerate/zero2.yaml --num_processes 2 --mixed_precision no scripts/eopd.py --config tiny-cpu` "
    "(docs/scaling.md); FSDP2 itself is checked on CPU only by tests/test_fsdp2.py's fully_shard harness."
)


def _launcher_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launch_problem(state) -> str | None:
    """One line saying why this launch must not train, or None. `state` is accelerate's `PartialState`."""
    # accelerate's FSDP plugin reads its version from FSDP_VERSION and defaults to 1.
    fsdp_version = os.environ.get("FSDP_VERSION", "1")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and fsdp_version != "2":
        return (
            f"the accelerate config asks for FSDP version {fsdp_version} (`fsdp_version`), which EOPD "
            "does not support: its loss reads the output layers' weights directly, which it handles (and is tested "
            "with) for FSDP2's sharded tensors only. Use FSDP2: `--config_file recipes/accelerate/fsdp2.yaml` (or "
            "`fsdp_version: 2`)."
        )
    from accelerate.utils import DistributedType

    world_size = max(_launcher_world_size(), state.num_processes)
    if state.distributed_type != DistributedType.NO or world_size <= 1:
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        setting = "its FSDP config (`distributed_type: FSDP`), which accelerate applies only on GPUs"
    else:
        setting = "a launcher that accelerate does not turn into DDP, DeepSpeed or FSDP on this machine"
    if state.num_processes > 1:
        setting += (
            f"; `ddp_backend: {state.backend}` joins the processes, but with distributed_type NO nothing averages "
            "their gradients"
        )
    return (
        f"{world_size} processes were launched (WORLD_SIZE={world_size}) but accelerate sees distributed_type NO, "
        f"because of {setting}: each process would train its own copy of the student on the same data. "
        + WORKING_CPU_LAUNCH
    )
