"""Regenerate the teacher checkpoint shipped with `trl-eopd demo` (trl_eopd/demo/assets/teacher).

The teacher is a small Qwen3 model trained from scratch, with plain PyTorch, on uniformly sampled valid solutions of
the demo's target-sum task. It takes several minutes on 2 CPU cores and is deterministic given `--seed`.

    python scripts/make_demo_teacher.py
"""

import argparse
import shutil
import time

import torch

from trl_eopd.demo.teacher import ASSETS_TEACHER, TEACHER_BATCH_SIZE, TEACHER_LR, TEACHER_STEPS, train_teacher


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(ASSETS_TEACHER), help="Where to save the teacher.")
    parser.add_argument("--steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--batch-size", type=int, default=TEACHER_BATCH_SIZE)
    parser.add_argument("--learning-rate", type=float, default=TEACHER_LR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One thread: tiny matrices gain nothing from a second one, and the result no longer depends on the core count.
    torch.set_num_threads(1)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    start = time.time()
    path = train_teacher(
        args.output_dir, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed
    )
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"Saved the teacher to {path} ({size / 1e6:.2f} MB) in {time.time() - start:.0f}s.")


if __name__ == "__main__":
    main()
