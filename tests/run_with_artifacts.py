"""Run a training script (by default the shipped `scripts/eopd.py`) with the tests' `SaveArtifacts` callback.

`python tests/run_with_artifacts.py [SCRIPT.py | -m trl_eopd.cli.train] ARGS...`, also under `accelerate launch`. The
script runs unchanged (`-m trl_eopd.cli.train` runs that module's entry point, as `python -m` would);
only `trl_eopd.cli.train.main` is given the extra callback, so the tests read back what a user's run would log.
"""

from __future__ import annotations

import functools
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trl_eopd.cli.train as train  # noqa: E402
from trl_eopd.cli.quiet import tell_deepspeed_when_cpu_only  # noqa: E402

# As the script's own entry point does, before anything imports DeepSpeed (the callback's transformers import does).
tell_deepspeed_when_cpu_only()
from _artifacts import SaveArtifacts  # noqa: E402

DEFAULT_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eopd.py"

if __name__ == "__main__":
    args = sys.argv[1:]
    train.main = functools.partial(train.main, callbacks=[SaveArtifacts()])
    if args[:2] == ["-m", "trl_eopd.cli.train"]:
        sys.exit(train.cli_main(args[2:]))
    else:
        script = args.pop(0) if args and args[0].endswith(".py") else str(DEFAULT_SCRIPT)
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
