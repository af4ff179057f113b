"""On-policy rollouts through vLLM for [`EOPDTrainer`].

Engine management and weight synchronisation are TRL's own `trl.generation.vllm_generation.VLLMGeneration`, the class
behind `DistillationTrainer` and `GRPOTrainer`. This module only decides what to ask it and when:

- one engine call for the whole gradient-accumulation window, after one weight push per optimizer step;
- the same sampling as the `generate` path (temperature, no top-k/top-p truncation, `max_new_tokens`, stop at either
  model's end token);
- the completions rebuilt into exactly the batch that `GKDTrainer.generate_on_policy_outputs` builds, so the loss, the
  token count and the teacher-EOS rewrite downstream cannot tell the two paths apart;
- the same on-policy/off-policy decision on every process (colocate engines and ZeRO-3 gathers are collectives);
- the sampler/trainer mismatch: vLLM's log-probability of each sampled token against the student's own, on logged
  steps only. The engine is asked for log-probs only then, and the student's side comes from the loss itself (it
  computes the student's log-softmax anyway), so unlogged steps pay nothing and logged ones no extra forward pass.

It is built from explicit arguments and knows nothing of the trainer: the trainer decides when to roll out, and
rewrites end-of-turn tokens and marks the batches afterwards.
"""

from __future__ import annotations

import math
import random

import torch

from . import _compat
from .loss.options import IGNORE_INDEX

MISMATCH_METRIC = "eopd/vllm_logprob_abs_diff"
# Batch key of vLLM's log-prob of each sampled token: a list of floats, one per loss token in the loss's order (NaN
# where there is none). `EOPDTrainer.compute_loss` pops it and compares it with the loss's own log-probs. A list, not a
# tensor, so that the Trainer's input preparation (which casts float tensors to bf16 under DeepSpeed) leaves it as is.
SAMPLER_LOGPROBS = "eopd_sampler_logprobs"


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


def _unpadded_rows(prompts: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[list[int]]:
    # The mask, not the pad id, marks padding: a pad id may also occur inside a real prompt.
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompts, prompt_attention_mask, strict=True)]


def _stop_token_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else sorted(set(eos_token_id))


class VLLMRollouts:
    """The student's on-policy completions for an accumulation window, from TRL's `VLLMGeneration`.

    Built by [`EOPDTrainer`] when `args.use_vllm` is set; the trainer calls [`roll_out`] with the prepared
    micro-batches of each window.

    Args:
        model: the student, as the trainer holds it (before `accelerator.prepare`).
        accelerator: the trainer's `Accelerator`.
        processing_class: the student's tokenizer (or processor).
        args ([`EOPDConfig`]): the training arguments; the `vllm_*` fields, sampling and batch sizes are read.
        eos_token_id (`int`, `list[int]` or `None`): the tokens a completion stops at (either model's end of turn).
        train_dataset: the training data, checked for too-long prompts before the engine starts.
        collator_max_length (`int` or `None`): the most prompt tokens the collator keeps.
    """

    def __init__(self, *, model, accelerator, processing_class, args, eos_token_id, train_dataset=None,
                 collator_max_length=None):  # fmt: skip
        self.model = model
        self.accelerator = accelerator
        self.args = args
        self.processing_class = processing_class
        name_or_path = getattr(self.model, "name_or_path", None)
        if not name_or_path:
            raise ValueError(
                "`use_vllm=True` needs a student that vLLM can load: pass `model` as a Hub id or local folder, or a "
                "model loaded with `from_pretrained` (its `name_or_path` is empty). vLLM builds its engine from that "
                "checkpoint, then receives the student's current weights before every rollout."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.pad_token_id = tokenizer.pad_token_id
        self.stop_token_ids = _stop_token_ids(eos_token_id)
        self.max_new_tokens = args.max_new_tokens
        self.max_model_length = args.vllm_max_model_length
        self._check_dataset_fits(train_dataset, collator_max_length)

        if self.accelerator.device.type == "cpu":
            # vLLM's repacked CPU weights cannot receive the student's (see `_compat`).
            _compat.disable_vllm_cpu_weight_repacking()
        _compat.trl_vllm_version_check_quiet()
        from trl.generation.vllm_generation import VLLMGeneration

        try:
            self.generation = VLLMGeneration(
                model=self.model,
                accelerator=self.accelerator,
                processing_class=processing_class,
                mode=args.vllm_mode,
                structured_outputs_regex=args.vllm_structured_outputs_regex,
                server_base_url=args.vllm_server_base_url,
                server_host=args.vllm_server_host,
                server_port=args.vllm_server_port,
                server_timeout=args.vllm_server_timeout,
                group_port=args.vllm_group_port,
                tensor_parallel_size=args.vllm_tensor_parallel_size,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                max_model_length=args.vllm_max_model_length,
                # A whole accumulation window is one engine call.
                max_num_seqs=args.per_device_train_batch_size
                * args.vllm_tensor_parallel_size
                * args.gradient_accumulation_steps,
                enable_sleep_mode=args.vllm_enable_sleep_mode,
                model_impl=args.vllm_model_impl,
                trust_remote_code=getattr(args, "trust_remote_code", False),
                # The `generate` path's sampling: GKDTrainer samples at `temperature` with top-k and top-p off.
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                min_p=0.0,
                repetition_penalty=1.0,
                max_completion_length=args.max_new_tokens,
                # The sampled token's log-probability (after temperature), for the mismatch metric; `roll_out` sets
                # it per call, since only logged steps need it.
                logprobs=None,
                # Token ids are all the trainer reads: skipping the text saves engine time, and a vocabulary padded
                # beyond the tokenizer (Qwen3's) can sample ids that have no text.
                generation_kwargs={"stop_token_ids": self.stop_token_ids, "detokenize": False},
            )
        except OSError as error:  # the builtin ConnectionError and requests' both derive from it
            if args.vllm_mode != "server":
                raise
            url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
            raise ConnectionError(
                f"No vLLM server answered at {url} within `vllm_server_timeout={args.vllm_server_timeout}` seconds. "
                f"Start one with `trl vllm-serve --model {name_or_path}` on that host, point "
                "`vllm_server_base_url` (or `vllm_server_host`/`vllm_server_port`) at it, or use "
                "`vllm_mode='colocate'`."
            ) from error
        if args.vllm_mode == "colocate":
            self.max_model_length = self.generation.llm.llm_engine.model_config.max_model_len
        self._synced_at_step = None
        # One value per measured micro-batch since the last log; the trainer logs their mean (see `log`).
        self.mismatch_values: list[float] = []

    def close(self) -> None:
        """Shut a colocated engine down, while the process groups it joined still exist (see `_compat`)."""
        llm = getattr(self.generation, "llm", None)
        if llm is not None:
            _compat.shut_down_vllm_engine(llm)
            self.generation.llm = None

    # ----------------------------------------------------------------------------------------------------------------
    # Checks

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
        configured = self.args.vllm_max_model_length is not None
        field = "vllm_max_model_length" if configured else "the model's context length"
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

    # ----------------------------------------------------------------------------------------------------------------
    # Rollouts

    def _on_policy_decisions(self, count: int, lmbda: float) -> list[bool]:
        """One draw per micro-batch, as the `generate` path makes, taken from the main process for everyone."""
        decisions = [random.random() <= lmbda for _ in range(count)]
        if self.accelerator.num_processes > 1 and 0.0 < lmbda < 1.0:
            from accelerate.utils import broadcast_object_list

            shared = [decisions]
            broadcast_object_list(shared, from_process=0)
            decisions = shared[0]
        return decisions

    def _sync_weights_once_per_step(self, step: int) -> None:
        if self._synced_at_step != step:
            self.generation.sync_weights()
            self._synced_at_step = step

    def roll_out(self, batches: list[dict], *, global_step: int, lmbda: float, measure_mismatch: bool) -> list[dict]:
        """Replace the completions of the on-policy micro-batches of one accumulation window by the student's.

        `global_step` is the optimizer step the window feeds (one weight push per step), `lmbda` the share of
        on-policy micro-batches, and `measure_mismatch` whether to measure the sampler/trainer mismatch (the trainer
        asks for it on logged steps only): then the engine returns each sampled token's log-prob, and each replaced
        batch carries them under `SAMPLER_LOGPROBS` for the loss to compare. Returns the batches that were replaced.
        """
        decisions = self._on_policy_decisions(len(batches), lmbda)
        on_policy = [batch for batch, on in zip(batches, decisions, strict=True) if on]
        if not on_policy:
            return []

        prompt_rows = [_unpadded_rows(b["prompts"], b["prompt_attention_mask"]) for b in on_policy]
        flat_prompts = [row for rows in prompt_rows for row in rows]
        self._check_prompt_lengths(flat_prompts)
        self._sync_weights_once_per_step(global_step)
        # `VLLMGeneration` reads `logprobs` at every call: the engine computes them only for the steps that log them.
        self.generation.logprobs = 0 if measure_mismatch else None
        _, completions, logprobs, _ = self.generation.generate(prompts=flat_prompts, images=None, num_generations=1)

        start = 0
        for batch, rows in zip(on_policy, prompt_rows, strict=True):
            batch_completions = [list(c) for c in completions[start : start + len(rows)]]
            batch_logprobs = logprobs[start : start + len(rows)] if logprobs is not None else None
            start += len(rows)
            input_ids, attention_mask, labels = build_rollout_batch(
                batch["prompts"], batch["prompt_attention_mask"], batch_completions, self.pad_token_id
            )
            batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            if measure_mismatch and batch_logprobs is not None:
                batch[SAMPLER_LOGPROBS] = sampler_logprobs_per_loss_token(labels, batch_logprobs)
        return on_policy

    # ----------------------------------------------------------------------------------------------------------------
    # Sampler/trainer mismatch

    def record_mismatch(self, sampler_logprobs: list[float], student_logprobs: torch.Tensor) -> None:
        """Add one micro-batch's mean |vLLM's log-prob - the student's| over its sampled tokens, over every process.

        Both are per loss token in the loss's order; NaN sampler entries (no log-prob, or a rewritten end token) are
        left out. Every process calls this for the same micro-batches: the measured steps and the on-policy decisions
        are the same everywhere.
        """
        sampler = torch.tensor(sampler_logprobs, dtype=torch.float64, device=student_logprobs.device)
        if sampler.numel() != student_logprobs.numel():
            raise RuntimeError(
                f"{sampler.numel()} vLLM log-probs for {student_logprobs.numel()} loss tokens: the batch's labels "
                "changed after the rollout."
            )
        diff = (sampler - student_logprobs.double()).abs()
        finite = torch.isfinite(diff)
        local = torch.stack([diff[finite].sum(), finite.sum().to(torch.float64)]).to(self.accelerator.device)
        totals = self.accelerator.reduce(local, reduction="sum")
        if totals[1] > 0:
            self.mismatch_values.append((totals[0] / totals[1]).item())


def sampler_logprobs_per_loss_token(labels: torch.Tensor, sampler_logprobs) -> list[float]:
    """vLLM's log-prob of each loss token of `labels[:, 1:]`, row-major (NaN where vLLM gave none)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    # vLLM reports one list of log-probs per completion token; row order and completion order match `mask`.
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
