"""Evaluation with the EOPD paper's protocol: sampled Avg@n and unbiased Pass@k on six math benchmarks."""

from .benchmarks import BENCHMARKS, BenchmarkSpec, benchmark_names, load_benchmark, resolve_benchmark
from .grading import MathVerifyGrader, last_boxed_content
from .passk import mean_accuracy, mean_pass_at_k, pass_at_k

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "EvalConfig",
    "MathVerifyGrader",
    "benchmark_names",
    "compare_runs",
    "last_boxed_content",
    "load_benchmark",
    "main",
    "mean_accuracy",
    "mean_pass_at_k",
    "pass_at_k",
    "resolve_benchmark",
    "run_evaluation",
]


def __getattr__(name):
    # The runner and CLI import transformers lazily; keep `pass_at_k` and the grader importable without that cost.
    if name in ("EvalConfig", "run_evaluation", "compare_runs"):
        from . import runner

        return getattr(runner, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
