"""Train with EOPD from a YAML recipe; a thin wrapper over `trl_eopd.train` for `accelerate launch`.

    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 8 scripts/eopd.py \
        --config recipes/qwen3-1.7b-math-eopd.yaml

It is equivalent to `trl-eopd train ...` and to `accelerate launch ... -m trl_eopd.train ...`.
"""

import sys

from trl_eopd.train import main

if __name__ == "__main__":
    sys.exit(main())
