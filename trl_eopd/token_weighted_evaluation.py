"""Evaluation that reports what it can honestly measure, token-weighted at any batch size: `EOPDTrainer`'s mixin.

The Trainer's `eval_loss` is a mean of per-batch means, so it moves with `per_device_eval_batch_size`; here it is
taken from the same per-token sums as the `eopd/*` metrics. Evaluation scores the dataset's completions, not the
student's own samples, so the sampled reverse-KL estimate (valid only on the student's samples) is replaced or left
out there.

The mixin reads what [`EOPDTrainer`] sets up: `loss_options`, `_teacher_server`, `_stats_class` and `_eopd_sums`
(the summed statistics per mode).
"""

from __future__ import annotations

from .loss import IGNORE_INDEX, EOPDLossOptions
from .loss.evaluation import evaluation_means


class TokenWeightedEvaluationMixin:
    """Overrides [`~transformers.Trainer.evaluation_loop`] and `prediction_step`, calling `super()` for the work."""

    def _loss_options_for(self, mode: str) -> EOPDLossOptions:
        """The loss options for training, or for evaluation, which scores the dataset's completions.

        The sampled estimate log q(y) - log p(y) is only valid on the student's own samples; on the dataset's
        completions its value estimates no KL (on a student close to its teacher it is often negative). Evaluation
        with a local teacher therefore takes its expectation over the student's next token at each prefix, the
        analytic reverse KL (`beta` is 1 with the sampled estimator). A served teacher gives no full distribution:
        its options stay, and its evaluation loss is the top-k forward KL instead (see `evaluation_loss_sum`).
        """
        if mode == "eval" and self._teacher_server is None and self.loss_options.reverse_kl_estimator == "sampled":
            return self.loss_options.replace(reverse_kl_estimator="analytic")
        return self.loss_options

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):  # fmt: skip
        """Run [`~transformers.Trainer.evaluation_loop`], then make its loss the mean over every token it scored.

        The Trainer's loss is a mean of per-batch means, so it changes with `per_device_eval_batch_size` on the same
        rows; the token-weighted sums behind the `eopd/*` metrics give the loss that equals its parts at any size.
        """
        # An evaluation reports its own tokens only, not leftovers of a `predict` or a manual `compute_loss` call.
        self._eopd_sums.pop("eval", None)
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )  # fmt: skip
        sums = self._eopd_sums.get("eval")
        loss_key = f"{metric_key_prefix}_loss"
        if sums is not None and loss_key in output.metrics:
            stats = self._stats_class.from_tensor(sums.cpu())
            output.metrics[loss_key], _ = evaluation_means(stats, self.loss_options.forward_kl_coef)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Without compute_metrics nobody reads evaluation logits; asking for them would force full-logits projections.
        if self.compute_metrics is None:
            prediction_loss_only = True
        inputs = self._without_repeated_rows(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _without_repeated_rows(self, inputs: dict) -> dict:
        """Leave out of the loss the rows accelerate repeats to fill every process's last evaluation batch.

        `gather_for_metrics` drops them from what the Trainer gathers; the `eopd/*` sums, and `eval_loss` made from
        them, add up each process's tokens, so the repeats are masked here. As `gather_for_metrics` assumes, the
        dataset's rows come first, in process order, and every process's last batch has the same number of rows.
        """
        state = self.accelerator.gradient_state
        repeats = self.accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0
        if not repeats or "labels" not in inputs:
            return inputs
        rows = inputs["labels"].size(0)
        kept = min(max(state.remainder - self.accelerator.process_index * rows, 0), rows)
        if kept == rows:
            return inputs
        labels = inputs["labels"].clone()
        labels[kept:] = IGNORE_INDEX
        return {**inputs, "labels": labels}


def metric_prefix(logs: dict) -> str:
    """`eval_` for `evaluate()`, `eval_<name>_` for a named eval dataset, matching the Trainer's `*_loss` key."""
    for key in logs:
        if key.endswith("_loss") and not key.startswith("eopd/"):
            return key[: -len("loss")]
    return "eval_"
