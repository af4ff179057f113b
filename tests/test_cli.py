"""The `trl-eopd` command as a newcomer meets it: help, typos, launches on a CPU machine, reruns into one folder."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_eopd import cli
from trl_eopd.cli.errors import UsageError
from trl_eopd.cli.preflight import announce_overwrite as _announce_overwrite
from trl_eopd.cli.train import make_parser, parse_args


def test_mistyped_command_suggests_the_closest(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'. Did you mean `trl-eopd train`?" in err
    assert cli.main(["xyzzy"]) == 2
    assert "Did you mean" not in capsys.readouterr().err


def test_top_level_help_loads_no_heavy_library():
    # What makes `trl-eopd --help` fast (scripts/bench_help.py times it): nothing heavy is imported to print it.
    code = (
        "import sys; from trl_eopd.cli import main; main(['--help']); "
        "print('LOADED', sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: trl-eopd <command>" in out
    assert "LOADED []" in out


def test_package_names_still_import_on_demand():
    import trl_eopd

    assert trl_eopd.eopd_loss.__module__ == "trl_eopd.loss.full"
    assert trl_eopd.EOPDConfig.__name__ == "EOPDConfig"
    with pytest.raises(AttributeError):
        trl_eopd.not_a_name  # noqa: B018


def test_train_help_lists_eopd_options_first():
    text = make_parser().format_help()
    assert text.splitlines()[0] == "usage: trl-eopd train [-h] [--config RECIPE] [--OPTION VALUE ...]"
    groups = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert groups[:3] == [
        "options:",
        "EOPD options (EOPDConfig's own fields):",
        "distillation options (inherited from TRL's GKDConfig):",
    ]
    eopd_section = text.split("EOPD options")[1].split("distillation options")[0]
    for field in (
        "--entropy_threshold",
        "--forward_kl_coef",
        "--gate",
        "--forward_kl_top_k",
        "--reverse_kl_estimator",
        "--memory_efficient_loss",
        "--loss_chunk_size",
        "--teacher_eos_token",
    ):
        assert field in eopd_section, field
    assert "--learning_rate" not in eopd_section
    assert text.index("--lmbda") < text.index("--dataset_name") < text.index("--learning_rate")


def test_accelerate_launch_with_bf16_and_a_float32_recipe_fails_in_one_line(monkeypatch, capsys, tiny_assets):
    from trl_eopd.cli.train import cli_main as main

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    # No LOCAL_RANK: the arguments would then set up a process group, which this check must come before anyway.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "tiny-cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bf16" in err[0] and "--mixed_precision no" in err[0], err
    # The other ranks find the same problem and stay silent.
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        main(["--config", "tiny-cpu"])
    assert capsys.readouterr().err == ""
    # Precision that agrees passes the check.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    parse_args(["--config", "tiny-cpu"])
    with pytest.raises(UsageError):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        parse_args(["--config", "tiny-cpu"])


def _args(output_dir, resume=None):
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=resume)


def test_rerun_into_a_finished_run_is_announced(tmp_path, capsys):
    main_process = SimpleNamespace(is_main_process=True)
    _announce_overwrite(main_process, _args(tmp_path / "fresh"))
    (tmp_path / "empty").mkdir()
    _announce_overwrite(main_process, _args(tmp_path / "empty"))
    assert capsys.readouterr().err == ""

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "model.safetensors").write_bytes(b"x")
    _announce_overwrite(main_process, _args(finished))
    err = capsys.readouterr().err
    assert f"{finished} already holds a finished run" in err and "will overwrite it" in err
    # Resuming continues the run rather than replacing it; other ranks never speak.
    _announce_overwrite(main_process, _args(finished, resume="true"))
    _announce_overwrite(SimpleNamespace(is_main_process=False), _args(finished))
    assert capsys.readouterr().err == ""


def test_help_texts_quote_the_readme_times():
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    from trl_eopd.cli import quickstart
    from trl_eopd.demo.cli import build_parser

    quick = next(a for a in build_parser()._actions if "--quick" in a.option_strings).help
    assert "20-second" in quick and "`trl-eopd demo --quick` checks the same pipeline in about 20 seconds" in readme
    assert "about 10 seconds" in quickstart.__doc__ and "For a 10-second install check" in readme
    assert "minute" not in quick + quickstart.__doc__


@pytest.mark.parametrize("keep", [False, True], ids=["temporary", "output-dir"])
def test_quickstart_leaves_no_folder_behind_unless_asked(tmp_path, monkeypatch, capsys, keep):
    import tempfile

    from trl_eopd.cli import quickstart

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    used = []
    run = quickstart._run

    def recording_run(args, output_dir):
        trainer = run(args, output_dir)
        used.append(Path(output_dir))
        assert (used[0] / "run" / "final" / "config.json").is_file()  # the run wrote where it says
        return trainer

    monkeypatch.setattr(quickstart, "_run", recording_run)
    kept = tmp_path / "kept"
    assert quickstart.main(["--steps", "1"] + (["--output-dir", str(kept)] if keep else [])) == 0
    out = capsys.readouterr().out
    assert "EOPD metrics per step" in out
    # (torch may leave its own compile cache in the temporary folder; only the quickstart's must go.)
    assert not [entry for entry in scratch.iterdir() if entry.name.startswith("trl-eopd")]
    if keep:
        assert used == [kept] and (kept / "run" / "final" / "config.json").is_file() and str(kept) in out
    else:
        assert used[0].parent == scratch and not used[0].exists() and "--output-dir" in out
