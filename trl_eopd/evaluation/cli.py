"""`trl-eopd eval`: evaluate a checkpoint with the paper's protocol, or compare two evaluated runs."""

from __future__ import annotations

import argparse
import json
import re
import sys

from .benchmarks import benchmark_names
from .generation import DEFAULT_PROMPT_TEMPLATE


def build_parser(prog: str = "trl-eopd eval") -> argparse.ArgumentParser:
    """The argument parser of `trl-eopd eval`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Evaluate a checkpoint on math benchmarks with the EOPD paper's protocol (n samples per problem, "
            "temperature 1.0, top-p 0.8, up to 8192 new tokens, zero-shot \\boxed{} prompt, math-verify grading) and "
            "report Avg@n and unbiased Pass@k. Rerunning into the same --output-dir resumes. With --compare, print "
            "the per-benchmark difference between two evaluated runs."
        ),
    )
    parser.add_argument("--model", help="Checkpoint directory or Hugging Face Hub id to evaluate.")
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=benchmark_names(),
        metavar="NAME[=PATH]",
        help=(
            f"Benchmarks, space- or comma-separated: {', '.join(benchmark_names())} (case-insensitive), or "
            "NAME=path.jsonl for a local file with problem/question and answer columns (default: all six)."
        ),
    )
    parser.add_argument("--n", type=int, default=8, help="Samples per problem (default: %(default)s).")
    parser.add_argument("--k", type=int, default=None, help="k of Pass@k (at most --n; defaults to --n).")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="Sampling temperature; 0 decodes greedily (default: %(default)s)."
    )
    parser.add_argument(
        "--top-p", type=float, default=0.8, help="Nucleus sampling mass; top-k is always off (default: %(default)s)."
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=8192, help="Length limit of each completion (default: %(default)s)."
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Where results.jsonl, summary.json and summary.md go (default: eval_results/<model name>).",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="Evaluate only the first N problems of each benchmark."
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "vllm", "transformers"],
        default="auto",
        help="Generation backend; auto uses vLLM when it is installed and a GPU is visible (default: %(default)s).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default: %(default)s).")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Problems per generation call, each giving n sequences (default: 2 for transformers, 256 for vLLM).",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="Weights dtype; auto keeps the checkpoint's (default: %(default)s).",
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer checkpoint (default: --model).")
    parser.add_argument(
        "--prompt-template",
        default=DEFAULT_PROMPT_TEMPLATE,
        help=(
            "User message with a {problem} placeholder; its hash is part of the protocol "
            "(default: ask to reason step by step and box the final answer)."
        ),
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="Use the plain prompt even when the tokenizer has a chat template.",
    )
    parser.add_argument(
        "--chat-template-kwargs",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="Extra chat-template variables as a JSON object, e.g. '{\"enable_thinking\": false}' for Qwen3.",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="Compare two results directories (or summary.json files): print b - a per benchmark, and exit.",
    )
    return parser


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def _split_benchmarks(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _default_output_dir(model: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/\\").split("/")[-1]) or "model"
    return f"eval_results/{name}"


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of `trl-eopd eval` and `python -m trl_eopd.evaluation`.

    Args:
        argv (`list[str]` or `None`, *optional*):
            Arguments without the program name; `sys.argv[1:]` when `None`.

    Returns:
        `int`: 0 on success. Bad arguments, unknown benchmarks and protocol mismatches exit with status 2 and a
        message on stderr, the way argparse reports errors.
    """
    from .runner import EvalConfig, EvaluationError, compare_runs, format_comparison, format_summary_table

    parser = build_parser()
    args = parser.parse_args(argv)

    if args.compare:
        try:
            comparison = compare_runs(*args.compare)
        except EvaluationError as error:
            parser.error(str(error))
        print(format_comparison(comparison))
        return 0

    if not args.model:
        parser.error("--model is required (or use --compare RUN_A RUN_B).")
    try:
        config = EvalConfig(
            model=args.model,
            benchmarks=_split_benchmarks(args.benchmarks),
            output_dir=args.output_dir or _default_output_dir(args.model),
            n=args.n,
            k=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            backend=args.backend,
            seed=args.seed,
            batch_size=args.batch_size,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            prompt_template=args.prompt_template,
            use_chat_template=not args.no_chat_template,
            chat_template_kwargs=args.chat_template_kwargs,
        )
    except EvaluationError as error:
        parser.error(str(error))

    from .runner import run_evaluation

    try:
        summary = run_evaluation(config)
    except (EvaluationError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_summary_table(summary))
    print(f"\nResults in {config.output_dir} (results.jsonl, summary.json, summary.md).")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
