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
# Batch key (server mode): optimizer steps between the weights that sampled the batch and the step that trains on it.
ROLLOUT_STALENESS = "eopd_rollout_staleness"


class RolloutSource:
    """The student's (or, with `seq_kd`, the teacher's) completions for one accumulation window.

    Subclasses implement [`roll_out_window`]. The base class keeps the sampler/trainer log-prob mismatch, which the
    trainer logs as `eopd/vllm_logprob_abs_diff`, and the extra metrics a source reports through [`pop_metrics`].
    """

    # Set by the trainer: `finish_window(batches, rolled_out, global_step)` completes a rolled-out window (end tokens,
    # a served teacher's log-probs). A source that samples ahead calls it in its background thread.
    finish_window = None

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

    def next_window(
        self, fetch, *, epoch_key, global_step: int, lmbda: float, measure_mismatch: bool
    ) -> tuple[list[dict], list[dict]]:
        """Read the Trainer's next window with `fetch()` and roll it out; the window's batches and the replaced ones.

        `epoch_key` identifies the Trainer's epoch iterator. A source that reads windows ahead (the asynchronous
        server source) overrides this; the others sample the window now.
        """
        batches = fetch()
        return batches, self.roll_out_window(
            batches, global_step=global_step, lmbda=lmbda, measure_mismatch=measure_mismatch
        )

    def pop_metrics(self) -> dict[str, float]:
        """Metrics to log since the last call (the mismatch mean, and whatever a subclass adds)."""
        metrics = {}
        if self.mismatch_values:
            metrics[MISMATCH_METRIC] = sum(self.mismatch_values) / len(self.mismatch_values)
            self.mismatch_values.clear()
        return metrics

    def finish_training(self, global_step: int) -> None:
        """Called on every process when `train()` returns (a server source sends the final weights)."""

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


class PromptLengthChecks:
    """Reject prompts that leave less than `max_new_tokens` of the sampler's context.

    vLLM would not fail on them: it stops the completion at the context length, which the loss would then train on
    as if the student had chosen to stop there. Users set `model`, `args`, `processing_class`, `max_new_tokens` and
    `max_model_length` (None: the model's own context length).
    """

    def context_limit_name(self) -> str:
        configured = self.args.vllm_max_model_length is not None
        return "vllm_max_model_length" if configured else "the model's context length"

    def _check_dataset_fits(self, dataset, collator_max_length) -> None:
        """Before the engine starts, reject prompts that leave less than `max_new_tokens` of context.

        vLLM would not fail on them: it stops the completion at the context length, which the loss would then train
        on as if the student had chosen to stop there.
        """
        limit = self.max_model_length
        if limit is None:
            text_config = self.model.config.get_text_config()
            limit = getattr(text_config, "max_position_embeddings", None)
        if limit is None:
            return
        budget = limit - self.max_new_tokens
        if collator_max_length is not None and collator_max_length <= budget:
            return  # the collator never keeps more prompt tokens than that
        if dataset is None or not hasattr(dataset, "__len__") or "messages" not in (dataset.column_names or []):
            return  # checked batch by batch in `_check_prompt_lengths`
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        for index, row in enumerate(dataset):
            text = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if collator_max_length is not None:
                length = min(length, collator_max_length)
            if length > budget:
                raise ValueError(self._too_long_message(length, limit, f"train_dataset row {index}"))

    def _too_long_message(self, prompt_length: int, limit: int, where: str) -> str:
        field = self.context_limit_name()
        return (
            f"{where} has a {prompt_length}-token prompt; with `max_new_tokens={self.max_new_tokens}` it needs "
            f"{prompt_length + self.max_new_tokens} tokens of context, more than {field} ({limit}). Raise "
            "`vllm_max_model_length`, lower `max_new_tokens`, or shorten prompts with `max_length` (the collator "
            "keeps the last `max_length` tokens)."
        )

    def _check_prompt_lengths(self, prompts: list[list[int]]) -> None:
        if self.max_model_length is None:
            return
        longest = max((len(p) for p in prompts), default=0)
        if longest + self.max_new_tokens > self.max_model_length:
            raise ValueError(self._too_long_message(longest, self.max_model_length, "A training batch"))


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
