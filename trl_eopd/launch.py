"""`trl-eopd launch` (deprecated): `accelerate launch` on `trl-eopd train` with a packaged accelerate config.

Kept so that existing commands keep working; it prints the `accelerate launch` command it runs, which is the one
documented way to start several processes. On a machine without GPUs it also passes `--mixed_precision no`, since
the packaged configs ask for bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._cpu_deepspeed import has_accelerator
from ._recipes import accelerate_config_path, list_accelerate_configs
from .errors import UsageError
from .parsing import extract_config

DEPRECATION = (
    "[trl-eopd] `trl-eopd launch` is deprecated: run `accelerate launch --config_file recipes/accelerate/NAME.yaml "
    "scripts/eopd.py --config RECIPE` (the command it runs is printed below)."
)

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
        if wanted not in (None, "no") and not (has_accelerator() if gpu is None else gpu):
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
    print(DEPRECATION, file=sys.stderr, flush=True)
    if any(a in ("-h", "--help") for a in argv):
        print(LAUNCH_HELP, end="")
        return 0
    try:
        command, notes = plan_launch(argv)
        # Resolve the recipe here too, so a bad recipe name fails before accelerate spawns anything.
        extract_config(command[command.index("trl_eopd.train") + 1 :])
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
