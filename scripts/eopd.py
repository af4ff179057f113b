"""Train with EOPD from a YAML recipe: the script to give `accelerate launch` for several processes.

    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 8 scripts/eopd.py \\
        --config recipes/qwen3-4b-dapo-eopd.yaml

On one process, `trl-eopd train --config ...` runs the same code (`trl_eopd/cli/train.py`: `make_parser` and `main`).
"""

import sys

from trl_eopd.cli.train import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
