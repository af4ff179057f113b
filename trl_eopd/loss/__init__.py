"""The EOPD loss: its options, the full-logits loss, the chunked loss on hidden states, and their statistics.

Everything here is pure (no trainer state). `options.py` defines the options once; `full.py` computes the loss on full
logits; `chunked.py` computes the same loss from hidden states a chunk at a time; `projection.py` reads a model's output
layer so that the chunked loss can project hidden states itself; `stats.py` holds the per-batch statistic sums;
`served.py` computes the loss from a vLLM-served teacher's top-k log-probabilities (see `trl_eopd/teacher_server.py`);
`importance.py` weights tokens sampled by older weights (asynchronous rollouts).
"""

from .chunked import chunked_eopd_loss_and_stats
from .full import eopd_loss, eopd_loss_and_stats, generalized_jsd_per_token, safe_divisor
from .importance import ImportanceCorrection
from .options import GATES, IGNORE_INDEX, REVERSE_KL_ESTIMATORS, EOPDLossOptions
from .served import ServedTeacherStats, served_teacher_eopd_loss_and_stats
from .stats import EOPDStats

__all__ = [
    "GATES",
    "IGNORE_INDEX",
    "REVERSE_KL_ESTIMATORS",
    "EOPDLossOptions",
    "EOPDStats",
    "ImportanceCorrection",
    "ServedTeacherStats",
    "chunked_eopd_loss_and_stats",
    "eopd_loss",
    "eopd_loss_and_stats",
    "generalized_jsd_per_token",
    "safe_divisor",
    "served_teacher_eopd_loss_and_stats",
]
