"""Wall time of the `trl-eopd` help texts, each in a fresh process, as a user types them.

`trl-eopd --help` and a mistyped command import nothing heavy and should answer well under a second; a subcommand's
help loads what that subcommand needs (TRL and transformers for `train`). Prints the median of `--repeats` runs.

    python scripts/bench_help.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["trian"], ["launch", "--help"], ["demo", "--help"], ["eval", "--help"], ["train", "--help"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    # The installed console script when there is one (what users run), else the same entry point through -m.
    executable = shutil.which("trl-eopd")
    prefix = [executable] if executable else [sys.executable, "-m", "trl_eopd.cli"]
    print(f"trl-eopd help timings, median of {args.repeats} fresh processes, {os.cpu_count()} CPUs")
    for command in COMMANDS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(prefix + command, capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        print(f"  trl-eopd {' '.join(command):<16} {statistics.median(times):6.2f} s")


if __name__ == "__main__":
    main()
