"""The error type of the command line, and how every subcommand reports it: one line on stderr, exit status 2."""

from __future__ import annotations

import difflib
import sys
from typing import NoReturn


class UsageError(Exception):
    """Bad user input, reported as one clear line before any model is loaded."""


def exit_with_error(prog: str, message: str) -> NoReturn:
    """Print `<prog>: error: <message>` as one line on stderr, and exit with argparse's status for bad input (2)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def one_line_errors(parser):
    """Make an argparse parser report bad input in one line pointing to `--help`, without printing its usage first.

    argparse prints the whole usage block before its error (a dozen lines for `trl-eopd eval`), which buries the one
    line that says what is wrong. Returns `parser`.
    """

    def error(message: str) -> NoReturn:
        hint = _suggestions(parser, message)
        exit_with_error(parser.prog, f"{message.rstrip('.')}{hint}. Run `{parser.prog} --help` for the options.")

    parser.error = error
    return parser


def _suggestions(parser, message: str) -> str:
    """` (--seed: did you mean --seeds?)`, naming the closest option of each unrecognised flag that has one."""
    from .._compat import ARGPARSE_UNRECOGNIZED, long_options

    if not message.startswith(ARGPARSE_UNRECOGNIZED):
        return ""
    options = long_options(parser)
    hints = []
    for flag in message[len(ARGPARSE_UNRECOGNIZED) :].split():
        if not flag.startswith("--"):
            continue
        close = difflib.get_close_matches(flag.split("=", 1)[0], options, n=1, cutoff=0.6)
        if close:
            hints.append(f"{flag}: did you mean {close[0]}?")
    return f" ({'; '.join(hints)})" if hints else ""
