"""Unbiased pass@k (Chen et al., 2021, "Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """
    Probability that at least one of `k` samples drawn without replacement from `n` is correct, given `c` correct.

    This is the unbiased estimator `1 - C(n - c, k) / C(n, k)`. It equals 1.0 when `n - c < k`, since
    every k-subset then holds a correct sample.

    Args:
        n (`int`):
            Number of samples generated for the problem.
        c (`int`):
            Number of those samples that are correct, `0 <= c <= n`.
        k (`int`):
            Subset size, `1 <= k <= n`.

    Returns:
        `float`: The estimate, in `[0, 1]`.

    Example:

    ```python
    >>> pass_at_k(n=8, c=1, k=8)
    1.0
    >>> round(pass_at_k(n=4, c=1, k=2), 4)
    0.5
    ```
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}.")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}.")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i). The binomials overflow floats for n in the thousands and
    # their ratio cancels catastrophically; the product of factors in (0, 1] does neither.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """
    Mean of [`pass_at_k`] over problems.

    Args:
        counts (`Sequence[tuple[int, int]]`):
            One `(n, c)` pair per problem.
        k (`int`):
            Subset size; every problem needs `n >= k`.

    Returns:
        `float`: The mean, or `nan` when `counts` is empty.
    """
    if not counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def mean_accuracy(counts: Sequence[tuple[int, int]]) -> float:
    """
    Avg@n: the per-problem fraction of correct samples, averaged over problems.

    Args:
        counts (`Sequence[tuple[int, int]]`):
            One `(n, c)` pair per problem.

    Returns:
        `float`: The mean, or `nan` when `counts` is empty.
    """
    if not counts:
        return float("nan")
    return sum(c / n for n, c in counts) / len(counts)
