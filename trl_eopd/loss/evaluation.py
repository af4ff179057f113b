"""What evaluation reports from the loss's summed statistics, local or served teacher alike.

Apart from `stats.py`, which the loss paths share, because it reads both kinds of statistics (`served.py` builds on
the chunked loss, which builds on `stats.py`).
"""

from __future__ import annotations

import torch

from .served import ServedTeacherStats
from .stats import EOPDStats

# With a served teacher the base term is the sampled estimate log q(y) - log p(y): valid only on the student's own
# samples. Evaluation scores the dataset's completions, where its value estimates no KL (it is often negative), so
# evaluation leaves it out, with the two loss terms that the evaluation loss is then no longer made of.
SERVED_METRICS_NOT_EVALUATED = ("eopd/reverse_kl_sampled", "eopd/loss_base", "eopd/loss_forward_gated")


def _is_served(stats) -> bool:
    if isinstance(stats, ServedTeacherStats):
        return True
    if isinstance(stats, EOPDStats):
        return False
    raise TypeError(f"Expected `EOPDStats` or `ServedTeacherStats`; got {type(stats).__name__}.")


def evaluation_loss_sum(stats, forward_kl_coef: float) -> torch.Tensor:
    """The evaluation loss summed over the tokens of `stats` (an [`EOPDStats`] or a `ServedTeacherStats`).

    With a local teacher it is the loss's own sum, `loss_base + forward_kl_coef * loss_forward`: evaluation computes
    the base term with the analytic reverse KL whatever `reverse_kl_estimator` (`EOPDTrainer._loss_options_for`). With
    a served teacher, whose full distribution is out of reach, it is the top-k forward KL over every token.
    """
    if _is_served(stats):
        return stats.forward_kl_top_k
    return stats.loss_base + forward_kl_coef * stats.loss_forward


def evaluation_means(stats, forward_kl_coef: float) -> tuple[float, dict[str, float]]:
    """`(loss, metrics)` of an evaluation from the sums of its whole pass: per-token means, as evaluation logs them.

    The loss is [`evaluation_loss_sum`] over the number of tokens, so it equals its `eopd/*` parts whatever the
    evaluation batch size; with a served teacher the metrics leave out `SERVED_METRICS_NOT_EVALUATED`.
    """
    means = stats.means()
    if _is_served(stats):
        # Also each served teacher's own (`eopd/teacher/<id>/loss_base`, ...) with several teachers.
        not_evaluated = {name.rsplit("/", 1)[1] for name in SERVED_METRICS_NOT_EVALUATED}
        for name in [name for name in means if name.rsplit("/", 1)[1] in not_evaluated]:
            means.pop(name)
    loss = float(evaluation_loss_sum(stats, forward_kl_coef)) / max(float(stats.num_tokens), 1.0)
    return loss, means
