"""Build the two-task training set of recipes/qwen3-1.7b-mopd-math-code-served.yaml: MATH and MBPP prompts, each
row with the `teacher_id` of the served teacher that distils it (`math` or `code`).

    python scripts/mopd_dataset.py --output data/mopd-math-code.jsonl

Each task keeps its own instruction in the prompt (a recipe's `prompt_template` would apply one to every row), and
the rows are shuffled, so that every accumulation window holds rows of both teachers.
"""

import argparse
from pathlib import Path

MATH_INSTRUCTION = "{}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CODE_INSTRUCTION = "{}\nWrite a Python function that solves this task. Put the code in one ```python block."


def build(seed: int, max_rows_per_task: int | None):
    from datasets import concatenate_datasets, load_dataset

    tasks = [
        ("math", "DigitalLearningGmbH/MATH-lighteval", None, "problem", MATH_INSTRUCTION),
        ("code", "google-research-datasets/mbpp", "full", "text", CODE_INSTRUCTION),
    ]
    parts = []
    for teacher_id, name, subset, column, instruction in tasks:
        split = load_dataset(name, subset, split="train")
        if max_rows_per_task is not None:
            split = split.select(range(min(max_rows_per_task, len(split))))
        parts.append(
            split.map(
                lambda row, instruction=instruction, column=column, teacher_id=teacher_id: {
                    "prompt": instruction.format(row[column]),
                    "teacher_id": teacher_id,
                },
                remove_columns=split.column_names,
            )
        )
    return concatenate_datasets(parts).shuffle(seed=seed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="data/mopd-math-code.jsonl", help="The JSON-lines file to write.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the shuffle.")
    parser.add_argument("--max-rows-per-task", type=int, default=None, help="Keep at most this many rows per task.")
    args = parser.parse_args(argv)
    dataset = build(args.seed, args.max_rows_per_task)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    dataset.to_json(args.output, lines=True)
    counts = {t: dataset["teacher_id"].count(t) for t in ("math", "code")}
    print(f"Wrote {len(dataset)} rows to {args.output}: {counts}.")


if __name__ == "__main__":
    main()
