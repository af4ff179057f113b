"""The README's opening commands are the ones CI and new users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def opening_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_two_commands():
    commands = opening_commands()
    assert len(commands) == 2 and all(commands)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = opening_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_first_command_is_a_real_subcommand():
    from trl_eopd.cli import SUBCOMMANDS

    first = opening_commands()[0]
    invoked = re.search(r"trl-eopd (\w+)", first).group(1)
    assert invoked in SUBCOMMANDS
