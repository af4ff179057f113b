"""The commands in the README and in `docs/*.md` work, wherever they stand on the page.

Nothing is trained here except the README's Python quick start (two steps on tiny models). Every other command is
checked by the parser that will read it, with the run stopped right after parsing: each `trl-eopd SUB ...` names a
real subcommand whose parser accepts its flags; each `--config` names a shipped recipe or an existing file whose keys
are options; each `accelerate launch` is accepted by accelerate's parser and names an existing config file and
script; each `python scripts/X.py ...` names an existing script whose parser accepts the flags; each `pip install`
of this project names its extras. Every linked page, image and heading exists. A kind of command this file does not
know how to check fails, so a new one cannot slip in unchecked.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)


def _block_commands(block: str) -> list[list[str]]:
    """The commands of a bash block as argument lists: continuations joined, comments dropped, `&&` split."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current = []
        for word in words + ["&&"]:
            if word in ("&&", ";"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def _inline_commands(path: Path) -> list[list[str]]:
    """`trl-eopd ...` written as inline code in the prose (code blocks removed first)."""
    prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [shlex.split(span) for span in re.findall(r"`(trl-eopd [^`]+)`", prose)]


def _all_commands():
    for page in PAGES:
        for block in _bash_blocks(page):
            for command in _block_commands(block):
                yield page, command
        for command in _inline_commands(page):
            yield page, command


def opening_commands():
    # The first block installs the CPU build of torch; the two commands follow it.
    block = _bash_blocks(ROOT / "README.md")[1]
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


# --- checking one command without running it -------------------------------------------------------------------------


class _Parsed(Exception):
    """Raised in place of running a command, once its parser has accepted the arguments."""


@contextmanager
def _stop_after_parsing():
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _parses(main, argv: list[str], what: str) -> None:
    """`main(argv)` reaches its parser, and the parser accepts `argv` (`--help` counts as accepted)."""
    with _stop_after_parsing():
        try:
            main(argv)
        except _Parsed:
            return
        except SystemExit as exit_:
            assert exit_.code == 0 and "--help" in argv, f"{what}: its parser rejected {argv} (exit {exit_.code})"
            return
    raise AssertionError(f"{what} ran without parsing its arguments")


def _subcommands() -> dict:
    from trl_eopd.cli import SUBCOMMANDS

    return SUBCOMMANDS


def _entry_point(subcommand: str):
    module, function = _subcommands()[subcommand][0].split(":")
    return importlib.import_module(module), function


def _recipe_file(value: str, what: str) -> Path:
    """What `--config` names: a file (relative to the repository root) or a packaged recipe."""
    path = ROOT / value
    if value.endswith((".yaml", ".yml")):
        assert path.is_file(), f"{what}: --config {value}: no such file"
        return path
    packaged = ROOT / "trl_eopd" / "recipes" / f"{value}.yaml"
    assert packaged.is_file(), f"{what}: --config {value}: no packaged recipe of that name"
    return packaged


def _check_train(argv: list[str], what: str) -> None:
    """The training script's arguments: recipe keys and flags are options of `make_parser()`, values of the right
    type. Parsed without building the config, which would validate the hardware (bf16 on a CPU)."""
    module, _ = _entry_point("train")
    parser = module.make_parser()
    valid = {f.name for cls in parser.dataclass_types for f in dataclasses.fields(cls) if f.init}
    flags, i = [], 0
    while i < len(argv):
        if argv[i] == "--config" or argv[i].startswith("--config="):
            value = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
            i += 1 if "=" in argv[i] else 2
            recipe = yaml.safe_load(_recipe_file(value, what).read_text()) or {}
            unknown = sorted(set(recipe) - valid - {"env"})
            assert not unknown, f"{what}: recipe {value} has unknown keys {unknown}"
            continue
        flags.append(argv[i])
        i += 1
    if "--help" in flags:
        return
    try:
        _, remaining = parser.parse_known_args(flags)
    except SystemExit as exit_:
        raise AssertionError(f"{what}: rejected {flags} (exit {exit_.code})") from None
    assert not remaining, f"{what}: unknown options {remaining}"


def _check_trl_eopd(argv: list[str], what: str) -> None:
    assert argv, f"{what}: no subcommand"
    subcommand, rest = argv[0], argv[1:]
    assert subcommand in _subcommands(), f"{what}: `trl-eopd {subcommand}` is not a subcommand"
    if subcommand == "train":
        _check_train(rest, what)
        return
    module, function = _entry_point(subcommand)
    _parses(getattr(module, function), rest, what)


def _check_script(script: str, argv: list[str], what: str) -> None:
    path = ROOT / script
    assert path.is_file(), f"{what}: no such script {script}"
    if path.name == "eopd.py":
        _check_train(argv, what)
        return
    namespace = runpy.run_path(str(path), run_name="docs_check")
    _parses(namespace["main"], argv, what)


def _check_module(argv: list[str], what: str) -> None:
    module, rest = argv[0], argv[1:]
    if module == "pytest":
        for target in (arg for arg in rest if not arg.startswith("-")):
            assert (ROOT / target.split("::")[0]).exists(), f"{what}: no test path {target}"
        return
    if module == "pip":
        _check_pip(rest, what)
        return
    if module == "trl_eopd.cli":
        _check_trl_eopd(rest, what)
        return
    if module == "trl_eopd.vllm_plugin.serve":  # vLLM's server with the teacher-entropy plugin: vLLM's own flags
        assert "--model" in rest[:-1] and not rest[rest.index("--model") + 1].startswith("-"), f"{what}: --model MODEL"
        _check_teacher_server_flags(rest, what)
        return
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{what}: no module {module}"
    if spec.submodule_search_locations is not None:
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{what}: package {module} has no __main__"


def _check_pip(argv: list[str], what: str) -> None:
    assert argv and argv[0] in ("install", "download", "uninstall"), f"{what}: pip {argv[:1]}"
    # The table's keys, read without tomllib (Python 3.11+; the project supports 3.10).
    table = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^([\w-]+) = ", table, re.M)
    for arg in argv[1:]:
        # trl-eopd is not on a package index: it installs from a clone, `.` or `.[extra,...]`.
        assert not arg.startswith("trl-eopd"), f"{what}: `pip install {arg}` needs a published package"
        local = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg)
        if local and local.group(1):
            missing = set(local.group(1).split(",")) - set(extras)
            assert not missing, f"{what}: pyproject.toml has no extra {sorted(missing)}"


def _check_accelerate(argv: list[str], what: str) -> None:
    from accelerate.commands.launch import launch_command_parser

    assert argv[:1] == ["launch"], f"{what}: only `accelerate launch` is checked"
    try:
        args = launch_command_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        raise AssertionError(f"{what}: accelerate rejected its flags (exit {exit_.code})") from None
    if args.config_file:
        assert (ROOT / args.config_file).is_file(), f"{what}: no accelerate config {args.config_file}"
    if args.module:
        _check_module([args.training_script, *args.training_script_args], what)
    else:
        _check_script(args.training_script, args.training_script_args, what)


def _check_vllm(argv: list[str], what: str) -> None:
    # vLLM is not installed here; what the docs must get right is the flags a served EOPD teacher needs.
    assert argv[:1] == ["serve"] and len(argv) > 1 and not argv[1].startswith("-"), f"{what}: `vllm serve MODEL ...`"
    _check_teacher_server_flags(argv, what)


def _check_teacher_server_flags(argv: list[str], what: str) -> None:
    joined = " ".join(argv)
    for flags in ("--max-logprobs -1", "--logprobs-mode processed_logprobs"):
        assert flags in joined, f"{what}: a served teacher needs `{flags}` (trl_eopd/teacher_server.py)"


def _check_ruff(argv: list[str], what: str) -> None:
    # The lint commands of docs/development.md are the ones tests/test_lint.py runs.
    assert argv in (["check", "."], ["format", "--check", "."]), f"{what}: `ruff {' '.join(argv)}` is not what CI runs"


def check_command(command: list[str], what: str) -> None:
    while command and _ENV_ASSIGNMENT.match(command[0]):
        command = command[1:]
    program, rest = command[0], command[1:]
    if program == "trl-eopd":
        _check_trl_eopd(rest, what)
    elif program == "accelerate":
        _check_accelerate(rest, what)
    elif program == "pip":
        _check_pip(rest, what)
    elif program == "vllm":
        _check_vllm(rest, what)
    elif program == "ruff":
        _check_ruff(rest, what)
    elif program in ("python", "python3") or program.endswith("/bin/python"):
        if rest[0] == "-m":
            _check_module(rest[1:], what)
        else:
            _check_script(rest[0], rest[1:], what)
    else:
        raise AssertionError(f"{what}: no check for a `{program}` command; teach tests/test_readme.py one")


# --- the tests -----------------------------------------------------------------------------------------------------


def test_cpu_torch_is_installed_before_the_first_command():
    readme = (ROOT / "README.md").read_text()
    install = _bash_blocks(ROOT / "README.md")[0].strip()
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


def test_every_command_in_the_docs_works():
    checked = 0
    for page, command in _all_commands():
        check_command(command, f"{page.relative_to(ROOT)}: `{shlex.join(command)}`")
        checked += 1
    # The README and the docs pages hold a few dozen commands; far fewer means the extraction broke.
    assert checked > 40


@pytest.mark.parametrize(
    "broken, message",
    [
        ("trl-eopd demo --stepz 3", "rejected"),
        ("trl-eopd trian --config tiny-cpu", "not a subcommand"),
        ("trl-eopd train --config tiny-gpu", "no packaged recipe"),
        ("trl-eopd train --config tiny-cpu --learning_rat 1e-4", "unknown options"),
        ("trl-eopd train --gradient_accumulation_steps many", "rejected"),
        ("trl-eopd eval --model tiny://student --nn 4", "rejected"),
        (
            "accelerate launch --config_file recipes/accelerate/zero4.yaml scripts/eopd.py --config tiny-cpu",
            "no accelerate",
        ),
        ("accelerate launch --num_processes 2 scripts/train.py --config tiny-cpu", "no such script"),
        ("python scripts/demo_study.py --layers 4", "rejected"),
        ('pip install -e ".[gpu]"', "no extra"),
        ('pip install "trl-eopd[vllm]"', "published package"),
        ("python -m pytest tests/test_nothing.py -q", "no test path"),
        ("python -m trl_eopd.vllm_plugin.serve --model M --max-logprobs -1", "a served teacher needs"),
        ("python -m trl_eopd.vllm_plugin.serve --max-logprobs -1 --logprobs-mode processed_logprobs", "--model MODEL"),
        ("git clone somewhere", "no check"),
    ],
)
def test_a_broken_command_is_caught(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_command(shlex.split(broken), broken)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_link_and_image_exists():
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links to a missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading for #{anchor} in {file}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"the README does not link docs/{page.name}"


def test_the_python_quick_start_runs(tmp_path):
    """The README's quick start, as written, in a fresh process on this machine (tiny models, two steps)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (quick_start,) = [block for block in blocks if "EOPDTrainer(" in block]
    assert "save_tiny_setup" in quick_start and "trainer.train()" in quick_start
    script = tmp_path / "quick_start.py"
    script.write_text(
        quick_start + "\nprint('trained steps:', trainer.state.global_step)\n"
        "print('logged:', sorted(k for e in trainer.state.log_history for k in e))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trained steps: 2" in proc.stdout and "eopd/reverse_kl" in proc.stdout, proc.stdout[-2000:]
    output = proc.stdout + proc.stderr
    # What the README says of it: no GPU here, so float32, "and says so in one line"; and nothing from DeepSpeed.
    assert len([line for line in output.splitlines() if "float32" in line]) == 1, output[-4000:]
    assert "Setting accelerator" not in output, output[:2000]
