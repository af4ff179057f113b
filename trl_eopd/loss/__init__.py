"""The EOPD loss: its options, the full-logits loss, the chunked loss on hidden states, and their statistics.

Everything here is pure (no trainer state). `options.py` defines the options once; `full.py` computes the loss on full
logits; `chunked.py` computes the same loss from hidden states a chunk at a time; `projection.py` reads a model's output
layer so that the chunked loss can project hidden states itself; `stats.py` holds the per-batch statistic sums.
"""

from .chunked import chunked_eopd_loss_and_stats
from .full import eopd_loss, eopd_loss_and_stats, generalized_jsd_per_token, safe_divisor
from .options import GATES, IGNORE_INDEX, REVERSE_KL_ESTIMATORS, EOPDLossOptions
from .stats import EOPDStats

__all__ = [
    "EOPDLossOptions",
    "EOPDStats",
    "GATES",
    "IGNORE_INDEX",
    "REVERSE_KL_ESTIMATORS",
    "chunked_eopd_loss_and_stats",
    "eopd_loss",
    "eopd_loss_and_stats",
    "generalized_jsd_per_token",
    "safe_divisor",
]
