"""The `trl-eopd` command: one entry point, one module per subcommand, each imported only when used.

Nothing heavy (torch, transformers, TRL) is imported before a subcommand is chosen, so `trl-eopd --help` and a
mistyped command answer at once; `python scripts/bench_help.py` measures it.
"""

from __future__ import annotations

import difflib
import importlib
import sys

SUBCOMMANDS = {
    "demo": (
        "trl_eopd.demo.cli:main",
        "OPD vs EOPD on a built-in synthetic reasoning task, on CPU, with no download.",
    ),
    "quickstart": (
        "trl_eopd.cli.quickstart:main",
        "Install check: a few EOPD steps on tiny local models; print metrics.",
    ),
    "train": (
        "trl_eopd.cli.train:cli_main",
        "Train with a recipe on one process: `trl-eopd train --config recipe.yaml`.",
    ),
    "eval": (
        "trl_eopd.evaluation.cli:main",
        "Avg@k / Pass@k of a checkpoint on MATH500, AIME, AMC, Minerva, OlympiadBench.",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: trl-eopd <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "Run `trl-eopd <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        from .. import __version__

        print(f"trl-eopd {__version__}")
        return 0
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1, cutoff=0.5)
        hint = f" Did you mean `trl-eopd {close[0]}`?" if close else ""
        print(f"trl-eopd: unknown command {command!r}.{hint}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module_name, function_name = SUBCOMMANDS[command][0].split(":")
    result = getattr(importlib.import_module(module_name), function_name)(rest)
    return int(result or 0)
