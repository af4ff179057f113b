"""On-policy rollouts through a vLLM engine inside every training process (`vllm_mode="colocate"`).

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

from .. import _compat
from .base import (
    SAMPLER_LOGPROBS,
    PromptLengthChecks,
    RolloutSource,
    build_rollout_batch,
    sampler_logprobs_per_loss_token,
    stop_token_ids,
    unpadded_rows,
)


class VLLMRollouts(PromptLengthChecks, RolloutSource):
    """The student's on-policy completions for an accumulation window, from TRL's `VLLMGeneration`.

    Built by [`EOPDTrainer`] when `args.use_vllm` is set; the trainer calls [`roll_out_window`] with the prepared
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
        super().__init__(accelerator)
        self.model = model
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
        self.stop_token_ids = stop_token_ids(eos_token_id)
        self.max_new_tokens = args.max_new_tokens
        self.max_model_length = args.vllm_max_model_length
        self._check_dataset_fits(train_dataset, collator_max_length)

        if self.accelerator.device.type == "cpu":
            # vLLM's repacked CPU weights cannot receive the student's (see `_compat`).
            _compat.disable_vllm_cpu_weight_repacking()
        _compat.trl_vllm_version_check_quiet()
        from trl.generation.vllm_generation import VLLMGeneration

        self.generation = VLLMGeneration(
            model=self.model,
            accelerator=self.accelerator,
            processing_class=processing_class,
            mode="colocate",  # the student's own server is `student_server.py`'s, reached over HTTP
            structured_outputs_regex=args.vllm_structured_outputs_regex,
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
            # The sampled token's log-probability (after temperature), for the mismatch metric; set per call,
            # since only logged steps need it.
            logprobs=None,
            # Token ids are all the trainer reads: skipping the text saves engine time, and a vocabulary padded
            # beyond the tokenizer (Qwen3's) can sample ids that have no text.
            generation_kwargs={"stop_token_ids": self.stop_token_ids, "detokenize": False},
        )
        self.max_model_length = self.generation.llm.llm_engine.model_config.max_model_len
        self._synced_at_step = None

    def close(self) -> None:
        """Shut a colocated engine down, while the process groups it joined still exist (see `_compat`)."""
        llm = getattr(self.generation, "llm", None)
        if llm is not None:
            _compat.shut_down_vllm_engine(llm)
            self.generation.llm = None

    # ----------------------------------------------------------------------------------------------------------------
    # Rollouts

    def _sync_weights_once_per_step(self, step: int) -> None:
        if self._synced_at_step != step:
            self.generation.sync_weights()
            self._synced_at_step = step

    def roll_out_window(
        self, batches: list[dict], *, global_step: int, lmbda: float, measure_mismatch: bool
    ) -> list[dict]:
        """Replace the completions of the on-policy micro-batches of one accumulation window by the student's.

        `global_step` is the optimizer step the window feeds (one weight push per step), `lmbda` the share of
        on-policy micro-batches, and `measure_mismatch` whether to measure the sampler/trainer mismatch (the trainer
        asks for it on logged steps only): then the engine returns each sampled token's log-prob, and each replaced
        batch carries them under `SAMPLER_LOGPROBS` for the loss to compare. Returns the batches that were replaced.
        """
        decisions = self.on_policy_decisions(len(batches), lmbda)
        on_policy = [batch for batch, on in zip(batches, decisions, strict=True) if on]
        if not on_policy:
            return []

        prompt_rows = [unpadded_rows(b["prompts"], b["prompt_attention_mask"]) for b in on_policy]
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
