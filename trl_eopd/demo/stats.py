"""Paired statistics over seeds: OPD and EOPD start from the same student per seed, so compare them seed by seed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95


def paired_difference(baseline: Sequence[float], treatment: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of `treatment[i] - baseline[i]` over seeds, with a Student-t interval at `confidence`.

    A t interval rather than a bootstrap: with a handful of seeds a percentile bootstrap is too narrow, and the t
    interval is the textbook one for a paired mean. With fewer than two seeds there is no spread to estimate, so the
    bounds are None (JSON null) rather than a made-up number.

    Returns `mean`, `ci_low`, `ci_high`, `n_seeds`, `std` (of the differences), `wins` and `losses` (seeds where the
    difference is above / below 0) and the per-seed `values`.
    """
    from scipy import stats

    if len(baseline) != len(treatment):
        raise ValueError(f"paired values need one per seed on both sides; got {len(baseline)} and {len(treatment)}.")
    if not baseline:
        raise ValueError("paired_difference needs at least one seed.")
    diffs = np.asarray(treatment, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = diffs.size
    mean = float(diffs.mean())
    if n < 2:
        low = high = std = None
    else:
        std = float(diffs.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return {
        "mean": mean,
        "ci_low": low,
        "ci_high": high,
        "n_seeds": int(n),
        "std": std,
        "wins": int((diffs > 0).sum()),
        "losses": int((diffs < 0).sum()),
        "values": diffs.tolist(),
    }


def paired_differences(baseline_runs: list[dict], treatment_runs: list[dict]) -> dict[str, dict]:
    """[`paired_difference`] for every numeric metric the two lists of per-seed results share."""
    keys = [
        key
        for key, value in baseline_runs[0].items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in treatment_runs[0]
    ]
    return {key: paired_difference([r[key] for r in baseline_runs], [r[key] for r in treatment_runs]) for key in keys}


def verdict(stat: dict) -> str:
    """`"ahead"`, `"behind"` or `"tie"`: whether the interval lies above 0, below 0, or covers it."""
    if stat["ci_low"] is None:
        return "tie"
    if stat["ci_low"] > 0:
        return "ahead"
    if stat["ci_high"] < 0:
        return "behind"
    return "tie"
