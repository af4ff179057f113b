"""`trl-eopd eval`: evaluate a checkpoint with the paper's protocol, or compare two evaluated runs."""

from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from ..cli.errors import exit_with_error, one_line_errors
from .benchmarks import TINY_BENCHMARK
from .runner import EvalConfig, EvaluationError, default_output_dir

PROG = "trl-eopd eval"

DESCRIPTION = (
    "Evaluate a checkpoint on math benchmarks with the EOPD paper's protocol (n samples per problem, temperature 1.0, "
    "top-p 0.8, up to 8192 new tokens, zero-shot \\boxed{} prompt, math-verify grading) and report Avg@n and unbiased "
    "Pass@k. Rerunning into the same --output-dir resumes. With --compare, print the per-benchmark difference between "
    "two evaluated runs."
)


def build_parser(prog: str = PROG) -> HfArgumentParser:
    """The parser of `trl-eopd eval`: the fields of [`EvalConfig`], plus `--no-chat-template` and `--compare`.

    Bad input is reported in one line, without the usage block, and no option is taken from an abbreviation.
    """
    # The plain formatter: each help text states its own default, some in words ("all six", "2 for transformers").
    parser = HfArgumentParser(
        EvalConfig, prog=prog, description=DESCRIPTION, formatter_class=argparse.HelpFormatter, allow_abbrev=False
    )
    one_line_errors(parser)
    # Unset until `main` knows the model: a `tiny://` model gets the shipped smoke-test problems, any other all six.
    parser.set_defaults(benchmarks=None)
    parser.add_argument(
        "--no-chat-template",
        dest="use_chat_template",
        action="store_false",
        help="Use the plain prompt even when the tokenizer has a chat template.",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="Compare two results directories (or summary.json files): print b - a per benchmark, and exit.",
    )
    return parser


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
    from .runner import compare_runs, format_comparison, format_summary_table, run_evaluation

    parser = build_parser()
    args = parser.parse_args(argv)

    if args.compare:
        try:
            comparison = compare_runs(*args.compare)
        except EvaluationError as error:
            exit_with_error(PROG, str(error))
        print(format_comparison(comparison))
        return 0

    from ..cli.errors import UsageError
    from ..cli.tiny_cache import TINY_SCHEME, resolve_tiny

    if args.benchmarks is None and args.model and args.model.startswith(TINY_SCHEME):
        # The tiny models answer nothing right: the six benchmarks would download thousands of problems to score 0.
        args.benchmarks = [TINY_BENCHMARK]
    if args.model and args.output_dir is None:
        # Named after what the user typed, not after the cache folder a `tiny://` name resolves to.
        args.output_dir = default_output_dir(args.model)

    try:
        # `tiny://` names are the same download-free models `trl-eopd train` accepts.
        args.model, args.tokenizer = resolve_tiny(args.model), resolve_tiny(args.tokenizer)
    except UsageError as error:
        exit_with_error(PROG, str(error))
    try:
        (config,) = parser.parse_dict(vars(args), allow_extra_keys=True)
    except EvaluationError as error:
        exit_with_error(PROG, str(error))

    try:
        summary = run_evaluation(config)
    except (EvaluationError, FileNotFoundError) as error:
        exit_with_error(PROG, str(error))
    print(format_summary_table(summary))
    print(f"\nResults in {config.output_dir} (results.jsonl, summary.json, summary.md).")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
