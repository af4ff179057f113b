"""What every rollout source shares: the interface the trainer calls, the batch layout, and the sampler metrics.

[`EOPDTrainer`] calls one [`RolloutSource`] once per gradient-accumulation window (`roll_out_window`). A source
replaces the completions of the window's on-policy micro-batches and returns those batches; the trainer then rewrites
end-of-turn tokens and counts the loss tokens. Sources know nothing of the trainer's loop.
"""

from __future__ import annotations

import math
import random

import torch

from ..loss.options import IGNORE_INDEX

MISMATCH_METRIC = "eopd/vllm_logprob_abs_diff"
# Batch key of the sampler's log-prob of each sampled token: a list of floats, one per loss token in the loss's order
# (NaN where there is none). `EOPDTrainer.compute_loss` pops it. A list, not a tensor, so that the Trainer's input
# preparation (which casts float tensors to bf16 under DeepSpeed) leaves it as is.
SAMPLER_LOGPROBS = "eopd_sampler_logprobs"


class RolloutSource:
    """The student's (or, with `seq_kd`, the teacher's) completions for one accumulation window.

    Subclasses implement [`roll_out_window`]. The base class keeps the sampler/trainer log-prob mismatch, which the
    trainer logs as `eopd/vllm_logprob_abs_diff`, and the extra metrics a source reports through [`pop_metrics`].
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        # One value per measured micro-batch since the last log; the trainer logs their mean.
        self.mismatch_values: list[float] = []

    def roll_out_window(
        self, batches: list[dict], *, global_step: int, lmbda: float, measure_mismatch: bool
    ) -> list[dict]:
        """Replace the completions of the window's sampled micro-batches in place; return the replaced batches.

        `global_step` is the optimizer step the window feeds, `lmbda` the share of on-policy micro-batches and
        `measure_mismatch` whether the step is logged (a source that samples elsewhere then attaches its log-prob of
        each sampled token under `SAMPLER_LOGPROBS`).
        """
        raise NotImplementedError

    def pop_metrics(self) -> dict[str, float]:
        """Metrics to log since the last call (the mismatch mean, and whatever a subclass adds)."""
        metrics = {}
        if self.mismatch_values:
            metrics[MISMATCH_METRIC] = sum(self.mismatch_values) / len(self.mismatch_values)
            self.mismatch_values.clear()
        return metrics

    def close(self) -> None:
        """Release what the source holds (an engine, a connection, a thread)."""

    def record_mismatch(self, sampler_logprobs: list[float], student_logprobs: torch.Tensor) -> None:
        """Add one micro-batch's mean |sampler's log-prob - the student's| over its sampled tokens, over every process.

        Both are per loss token in the loss's order; NaN sampler entries (no log-prob, or a rewritten end token) are
        left out. Every process calls this for the same micro-batches: the measured steps and the on-policy decisions
        are the same everywhere.
        """
        sampler = torch.tensor(sampler_logprobs, dtype=torch.float64, device=student_logprobs.device)
        if sampler.numel() != student_logprobs.numel():
            raise RuntimeError(
                f"{sampler.numel()} sampler log-probs for {student_logprobs.numel()} loss tokens: the batch's labels "
                "changed after the rollout."
            )
        diff = (sampler - student_logprobs.double()).abs()
        finite = torch.isfinite(diff)
        local = torch.stack([diff[finite].sum(), finite.sum().to(torch.float64)]).to(self.accelerator.device)
        totals = self.accelerator.reduce(local, reduction="sum")
        if totals[1] > 0:
            self.mismatch_values.append((totals[0] / totals[1]).item())

    def on_policy_decisions(self, count: int, lmbda: float) -> list[bool]:
        """One draw per micro-batch, as the `generate` path makes, taken from the main process for everyone."""
        decisions = [random.random() <= lmbda for _ in range(count)]
        if self.accelerator.num_processes > 1 and 0.0 < lmbda < 1.0:
            from accelerate.utils import broadcast_object_list

            shared = [decisions]
            broadcast_object_list(shared, from_process=0)
            decisions = shared[0]
        return decisions


def build_rollout_batch(
    prompts: torch.Tensor, prompt_attention_mask: torch.Tensor, completions: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out sampled completions exactly as `GKDTrainer.generate_on_policy_outputs` does after `generate`.

    `prompts` stays left-padded as the collator made it; each completion (already cut after its stop token, which is
    kept) is right-padded with `pad_token_id` to the longest one. The attention mask is the prompt mask followed by
    ones over each completion; labels are the token ids there and -100 on the prompt and on padding.
    """
    batch_size, prompt_width = prompts.shape
    if len(completions) != batch_size:
        raise ValueError(f"{len(completions)} completions for {batch_size} prompts.")
    width = max((len(completion) for completion in completions), default=0)
    completion_ids = torch.full((batch_size, width), pad_token_id, dtype=prompts.dtype, device=prompts.device)
    completion_mask = torch.zeros((batch_size, width), dtype=prompt_attention_mask.dtype, device=prompts.device)
    for row, completion in enumerate(completions):
        completion_ids[row, : len(completion)] = torch.as_tensor(completion, dtype=prompts.dtype)
        completion_mask[row, : len(completion)] = 1
    input_ids = torch.cat([prompts, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_attention_mask, completion_mask], dim=1)
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[:, :prompt_width] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def unpadded_rows(prompts: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[list[int]]:
    # The mask, not the pad id, marks padding: a pad id may also occur inside a real prompt.
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompts, prompt_attention_mask, strict=True)]


def stop_token_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else sorted(set(eos_token_id))


def sampler_logprobs_per_loss_token(labels: torch.Tensor, sampler_logprobs) -> list[float]:
    """vLLM's log-prob of each loss token of `labels[:, 1:]`, row-major (NaN where vLLM gave none).

    `sampler_logprobs` holds one entry per completion row, and in it one list per completion token whose first item
    is the sampled token's log-prob (vLLM's layout).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    values = [math.nan if lp[0] is None else lp[0] for row in sampler_logprobs for lp in row]
    if len(values) != int(mask.sum()):
        raise RuntimeError(
            f"vLLM returned {len(values)} log-probs for {int(mask.sum())} completion tokens; the rollout batch and "
            "the engine's outputs are out of step."
        )
    return values


def without_rewritten_tokens(values: list[float], sampled_labels: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """`values` (one per loss token of `sampled_labels`) with NaN where `labels` no longer holds the sampled token.

    A student end token rewritten to the teacher's is not what vLLM sampled: the loss scores the teacher's there.
    """
    mask = sampled_labels[:, 1:] != IGNORE_INDEX
    rewritten = (labels != sampled_labels)[:, 1:][mask].tolist()
    return [math.nan if changed else value for value, changed in zip(values, rewritten, strict=True)]
