"""The README's opening commands are the ones CI and new users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def opening_commands():
    # The first block installs the CPU build of torch; the two commands follow it.
    block = _bash_blocks()[1]
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_cpu_torch_is_installed_before_the_first_command():
    readme = (ROOT / "README.md").read_text()
    install = _bash_blocks()[0].strip()
    # PyTorch's own way of selecting the CPU build, at the version CI installs.
    ci_pin = re.search(r'"(torch==[\d.]+)"', (ROOT / ".ci" / "run").read_text()).group(1)
    assert install == f"pip install {ci_pin} --index-url https://download.pytorch.org/whl/cpu"
    assert readme.index(install) < readme.index(opening_commands()[0])
    between = readme[readme.index(install) : readme.index(opening_commands()[0])]
    assert "Without it" in between and "CUDA" in between


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
