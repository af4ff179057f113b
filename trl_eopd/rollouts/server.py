"""Rollouts on the student's own vLLM server (`vllm_mode="server"`), synchronous or overlapped with training.

Each optimizer step's window is sampled by the server through `/v1/completions` with token-id prompts, and the
student's weights reach the server every `weight_sync_steps` steps (see `weights.py` and `student_server.py`).

With `max_staleness=0` everything is synchronous: push the current weights, sample the window, train on it; the loss is
exactly the colocated engine's on the same completions. With `max_staleness=k >= 1` the source reads the windows of
the next steps from the Trainer's epoch iterator ahead of time and samples them in a background thread while the
current window trains:

- a window sampled with the weights of step v and trained at step s has staleness s - v <= k: the queue holds at most
  `k - weight_sync_steps + 1` windows beyond the current one, and a push happens at least every `weight_sync_steps`;
- a push waits until no request is in flight, so every sample comes from one version of the weights, and happens in
  the main thread (a ZeRO-3 gather is a collective); the background thread only talks HTTP;
- the prompts are the Trainer's own, in its order: a window is consumed only when the Trainer asks for it, so at a
  checkpoint or at the end of training the windows read ahead are simply never trained on, and a resumed run reads
  them again. Every prompt is trained on exactly as often as in synchronous training.

Each sampled batch carries vLLM's log-prob of every sampled token and its staleness; the trainer weights the sampled
reverse-KL term of stale tokens by a truncated importance ratio (see `trl_eopd/loss/importance.py`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .base import (
    ROLLOUT_STALENESS,
    SAMPLER_LOGPROBS,
    PromptLengthChecks,
    RolloutSource,
    build_rollout_batch,
    stop_token_ids,
    unpadded_rows,
)
from .student_server import StudentServer
from .weights import is_lora_student, write_full_weights, write_lora_adapter

STALENESS_METRIC = "eopd/rollout_staleness"
RATIO_MEAN_METRIC = "eopd/importance_ratio_mean"
RATIO_CLIPPED_METRIC = "eopd/importance_ratio_clipped_share"


@dataclass
class _Window:
    batches: list[dict]
    on_policy: list[dict]
    version: int
    result: Future | None = None


def _default_weights_dir() -> str:
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="trl-eopd-student-", dir=root)


class ServerRollouts(PromptLengthChecks, RolloutSource):
    """The student's completions from its own vLLM server, one window per optimizer step.

    Args:
        model: the student, as the trainer holds it (before `accelerator.prepare`).
        accelerator: the trainer's `Accelerator`.
        processing_class: the student's tokenizer (or processor).
        args ([`EOPDConfig`]): the training arguments (`vllm_server_*`, `max_staleness`, `weight_sync_steps`,
            `importance_ratio_cap`, sampling and lengths).
        eos_token_id (`int`, `list[int]` or `None`): the tokens a completion stops at.
        train_dataset: the training data, checked for too-long prompts at start.
        collator_max_length (`int` or `None`): the most prompt tokens the collator keeps.
    """

    def __init__(self, *, model, accelerator, processing_class, args, eos_token_id, train_dataset=None,
                 collator_max_length=None):  # fmt: skip
        super().__init__(accelerator)
        self.model = model
        self.args = args
        self.processing_class = processing_class
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.pad_token_id = tokenizer.pad_token_id
        self.stop_token_ids = stop_token_ids(eos_token_id)
        self.max_new_tokens = args.max_new_tokens
        self.max_staleness = args.max_staleness
        self.weight_sync_steps = args.weight_sync_steps
        self.lookahead = args.max_staleness - args.weight_sync_steps + 1
        self.lora = is_lora_student(model)
        base = model.get_base_model() if self.lora else model
        student_name = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", "")
        url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        self.server = StudentServer(
            url,
            timeout=args.vllm_server_timeout,
            retries=args.vllm_server_retries,
            student_name=student_name,
            vocab_size=base.config.get_text_config().vocab_size,
            lora=self.lora,
        )
        self.max_model_length = self.server.max_model_len
        self._check_dataset_fits(train_dataset, collator_max_length)
        # Without `vllm_server_weights_dir`, the main process makes a folder at the first push and removes it when
        # training ends (a LoRA adapter's stays: the server reads it when a request first needs it).
        self._made_weights_dir = args.vllm_server_weights_dir is None and accelerator.is_main_process
        self.weights_dir = args.vllm_server_weights_dir
        self._pushed_version: int | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="eopd-rollouts") if self.lookahead > 0 else None
        self._queue: deque[_Window] = deque()
        self._epoch_key = None
        self._epoch_exhausted = False
        self._next_step = 0
        # Since the last log: (staleness sum, windows) and (ratio sum, clipped, tokens), reduced over processes.
        self._staleness = [0.0, 0]
        self._ratios = torch.zeros(3, dtype=torch.float64)

    def context_limit_name(self) -> str:
        return f"the student server's `--max-model-len` ({self.server.url})"

    # ---------------------------------------------------------------------------------------------- weights

    def push_weights(self, global_step: int) -> None:
        """Send the current weights to the server; every process calls this, with no request in flight."""
        self.accelerator.wait_for_everyone()
        is_main = self.accelerator.is_main_process
        if is_main and self.weights_dir is None:
            self.weights_dir = _default_weights_dir()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self._pushed_version is None or not self.lora:
            # A LoRA student's base weights go once, so that the server's base is the student's whatever it held.
            folder = os.path.join(self.weights_dir, "weights") if is_main else ""
            write_full_weights(unwrapped, folder, is_main_process=is_main, merge_adapter=False)
            if is_main:
                self.server.load_weights(folder, global_step, adapter=False)
                shutil.rmtree(folder, ignore_errors=True)  # loaded: a model-sized copy need not stay in memory
        if self.lora:
            folder = os.path.join(self.weights_dir, "adapter") if is_main else ""
            write_lora_adapter(unwrapped, folder, is_main_process=is_main)
            if is_main:
                # Kept until the next push: the server may read an adapter again after loading it (it did, on CPU).
                self.server.load_weights(folder, global_step, adapter=True)
        self.accelerator.wait_for_everyone()
        self._pushed_version = global_step

    def _push_due(self, global_step: int) -> bool:
        return self._pushed_version is None or global_step - self._pushed_version >= self.weight_sync_steps

    # ---------------------------------------------------------------------------------------------- sampling

    def _sample(self, window: _Window, global_step: int) -> None:
        """Sample `window`'s on-policy batches (in whatever thread) and lay them out in place."""
        prompt_rows = [unpadded_rows(b["prompts"], b["prompt_attention_mask"]) for b in window.on_policy]
        flat_prompts = [row for rows in prompt_rows for row in rows]
        completions, logprobs = self.server.sample(
            flat_prompts,
            max_tokens=self.max_new_tokens,
            temperature=self.args.temperature,
            stop_token_ids=self.stop_token_ids,
            global_step=global_step,
        )
        start = 0
        for batch, rows in zip(window.on_policy, prompt_rows, strict=True):
            end = start + len(rows)
            input_ids, attention_mask, labels = build_rollout_batch(
                batch["prompts"], batch["prompt_attention_mask"], completions[start:end], self.pad_token_id
            )
            batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            batch[SAMPLER_LOGPROBS] = [value for row in logprobs[start:end] for value in row]
            start = end

    def _sample_and_finish(self, window: _Window, global_step: int) -> None:
        self._sample(window, global_step)
        if self.finish_window is not None:
            self.finish_window(window.batches, window.on_policy, global_step)

    def _new_window(self, batches: list[dict], lmbda: float) -> _Window:
        decisions = self.on_policy_decisions(len(batches), lmbda)
        on_policy = [batch for batch, on in zip(batches, decisions, strict=True) if on]
        for batch in on_policy:
            self._check_prompt_lengths(unpadded_rows(batch["prompts"], batch["prompt_attention_mask"]))
        return _Window(batches=batches, on_policy=on_policy, version=self._pushed_version)

    def _finish(self, window: _Window, global_step: int) -> tuple[list[dict], list[dict]]:
        staleness = global_step - window.version
        for batch in window.on_policy:
            batch[ROLLOUT_STALENESS] = staleness
        if window.on_policy:
            self._staleness[0] += staleness
            self._staleness[1] += 1
        return window.batches, window.on_policy

    def roll_out_window(
        self, batches: list[dict], *, global_step: int, lmbda: float, measure_mismatch: bool
    ) -> list[dict]:
        # Outside the Trainer's loop: synchronous, with the current weights.
        if self._push_due(global_step) or self._queue:
            self._drain()
            self.push_weights(global_step)
        window = self._new_window(batches, lmbda)
        self._sample(window, global_step)
        return self._finish(window, global_step)[1]

    def next_window(self, fetch, *, epoch_key, global_step: int, lmbda: float, measure_mismatch: bool):
        if self.lookahead == 0:
            return super().next_window(fetch, epoch_key=epoch_key, global_step=global_step, lmbda=lmbda,
                                       measure_mismatch=measure_mismatch)  # fmt: skip
        if epoch_key is not self._epoch_key:
            # A new epoch (or the first): the Trainer trained every window read ahead from the previous one, or
            # stopped (max_steps); either way nothing queued belongs to this iterator.
            self._drain()
            self._queue.clear()
            self._epoch_key, self._epoch_exhausted, self._next_step = epoch_key, False, global_step
        if self._push_due(global_step):
            self._drain()
            self.push_weights(global_step)
        while not self._epoch_exhausted and len(self._queue) <= self.lookahead:
            batches = fetch()
            if not batches:
                self._epoch_exhausted = True
                break
            window = self._new_window(batches, lmbda)
            window.result = self._executor.submit(self._sample_and_finish, window, self._next_step)
            self._queue.append(window)
            self._next_step += 1
        if not self._queue:
            return [], []
        window = self._queue.popleft()
        window.result.result()  # re-raises the background thread's error here, naming the URL and the step
        return self._finish(window, global_step)

    def _drain(self) -> None:
        for window in self._queue:
            if window.result is not None:
                window.result.result()

    # ---------------------------------------------------------------------------------------------- metrics

    def record_importance_ratios(self, importance, student_log_probs: torch.Tensor) -> None:
        """Add a stale micro-batch's truncated ratios (tokens with a sampler log-prob) to the logged mean and share."""
        known = ~torch.isnan(importance.sampler_log_probs)
        ratios = importance.ratios(student_log_probs)[known]
        raw = torch.exp(student_log_probs.float() - importance.sampler_log_probs.to(student_log_probs.device))[known]
        self._ratios += torch.tensor(
            [ratios.double().sum().item(), (raw > importance.cap).sum().item(), float(ratios.numel())],
            dtype=torch.float64,
        )

    def pop_metrics(self) -> dict[str, float]:
        metrics = super().pop_metrics()
        local = torch.cat([torch.tensor(self._staleness, dtype=torch.float64), self._ratios])
        totals = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").cpu()
        self._staleness = [0.0, 0]
        self._ratios.zero_()
        if totals[1] > 0:
            metrics[STALENESS_METRIC] = (totals[0] / totals[1]).item()
        if totals[4] > 0:
            metrics[RATIO_MEAN_METRIC] = (totals[2] / totals[4]).item()
            metrics[RATIO_CLIPPED_METRIC] = (totals[3] / totals[4]).item()
        return metrics

    def finish_training(self, global_step: int) -> None:
        # Rollouts read ahead are never trained on; the server ends with the trained weights, ready to evaluate.
        self._drain()
        self._queue.clear()
        self._epoch_key = None
        if self._pushed_version != global_step:
            self.push_weights(global_step)
        if self._made_weights_dir and not self.lora and self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)
            self.weights_dir = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self.server.close()
        if self._made_weights_dir and self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)
