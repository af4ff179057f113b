"""EOPDTrainer: TRL's GKDTrainer with the entropy-gated EOPD loss and the fixes on-policy distillation needs."""

from __future__ import annotations

import functools
import textwrap
import warnings
from collections.abc import Callable

import torch
from accelerate.utils import send_to_device
from torch import nn
from transformers.utils import is_peft_available
from trl.trainer.utils import maybe_gather_lm_head_ctx

from . import _compat
from ._gkd import GKDTrainer
from ._paths import check_model_path
from .collator import PromptKeepingChatMLCollator, check_dataset_columns, check_not_empty
from .config import EOPDConfig
from .launch_check import launch_problem
from .loss import (
    IGNORE_INDEX,
    EOPDStats,
    ImportanceCorrection,
    chunked_eopd_loss_and_stats,
    eopd_loss_and_stats,
)
from .loss.evaluation import evaluation_loss_sum, evaluation_means
from .loss.full import safe_divisor
from .loss.projection import (
    OutputProjection,
    count_non_finite_rows,
    find_output_projection,
    gathered,
    is_fsdp2_sharded,
    last_hidden_state,
    project,
)
from .rollouts import ROLLOUT_STALENESS, SAMPLER_LOGPROBS, build_rollout_source, without_rewritten_tokens
from .token_weighted_evaluation import TokenWeightedEvaluationMixin, metric_prefix

if is_peft_available():
    from peft import PeftConfig


# Set on batches whose completions were already generated for the whole accumulation window in `get_batch_samples`.
_ROLLOUT_DONE = "eopd_rollout_done"
# With a served teacher: the batch's `ServedTeacherLogProbs`, fetched once per accumulation window.
_SERVED_TEACHER = "eopd_served_teacher"


def _distributed_state(args):
    from accelerate import PartialState

    _ = args.device  # the training arguments set up the process group (with their `ddp_backend`) on first use
    return PartialState()


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def _check_processing_class(processing_class) -> None:
    if processing_class is None:
        raise ValueError(
            "`processing_class` is required: pass the student's tokenizer, e.g. "
            "`processing_class=AutoTokenizer.from_pretrained(student_id)`. It formats the chat data and pads batches."
        )
    tokenizer = _tokenizer_of(processing_class)
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            f"The tokenizer passed as `processing_class` ({type(tokenizer).__name__}) has no pad token, which batching "
            "and generation need. Set one before building the trainer, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
        )


class EOPDTrainer(_compat.RestoresRngBeforeRollouts, TokenWeightedEvaluationMixin, GKDTrainer):
    """Trainer for Entropy-Aware On-Policy Distillation (EOPD) of language models.

    EOPD trains the student with a reverse KL on its own samples at every token, plus a forward KL at the tokens where
    the teacher's entropy is above `args.entropy_threshold`, where reverse KL alone would collapse the student onto
    one of several valid continuations. See [`eopd_loss`] for the exact loss.

    `EOPDTrainer` is a drop-in replacement for TRL's `GKDTrainer`: same constructor, same datasets. Compared with
    `GKDTrainer` it also:

    - normalises the loss by the number of completion tokens that actually enter it, counted after on-policy
      generation, across gradient accumulation and processes;
    - applies `temperature` to the divergences and the entropy, not only to sampling;
    - by default computes the loss from hidden states a chunk of completion tokens at a time (see
      `EOPDConfig.memory_efficient_loss`), instead of full `(batch, seq, vocab)` logits for both models;
    - logs `eopd/*` metrics (entropies, high-entropy shares at the gate's and at a gate-independent threshold, reverse
      and forward KL, and the loss's two terms as used), token-weighted over every micro-batch, step and process since
      the last log, in training and evaluation, where `eval_loss` is token-weighted too, whatever the eval batch size;
    - keeps prompts longer than the room `max_length` leaves whole (cutting the reference completion instead, with a
      warning), and names the model when sampling hits non-finite probabilities;
    - with `args.use_vllm`, samples the on-policy completions with vLLM through TRL's `VLLMGeneration`, one engine call
      per accumulation window (see `trl_eopd/rollouts/`).

    Args:
        model ([`~transformers.PreTrainedModel`] or `torch.nn.Module` or `str`, *optional*):
            Student model to train, or its name/path on the Hub.
        teacher_model ([`~transformers.PreTrainedModel`] or `torch.nn.Module` or `str`, *optional*):
            Teacher model, or its name/path. It must share the student's vocabulary. With
            `args.teacher_model_server_url` the teacher is served elsewhere: pass `None`, or its name, which is then
            only compared with the served model's.
        args ([`EOPDConfig`]):
            Training arguments.
        data_collator ([`~transformers.DataCollator`], *optional*):
            Batches the data. Defaults to TRL's ChatML collator over a `messages` column.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`], *optional*):
            Training prompts (and completions, used when a batch is not on-policy), in a `messages` column. A streaming
            dataset needs `args.max_steps`, as with any Trainer.
        eval_dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `dict` of them, *optional*):
            Evaluation data. Evaluation scores the dataset's completions, as `GKDTrainer` does. The sampled
            reverse-KL estimate is only valid on the student's own samples, so with
            `args.reverse_kl_estimator="sampled"` evaluation takes the analytic reverse KL instead (local teacher),
            or leaves the estimate out and reports the top-k forward KL as `eval_loss` (served teacher).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The student's tokenizer; it must have a pad token.
        compute_metrics (`Callable`, *optional*):
            As in [`~transformers.Trainer`]. Setting it makes evaluation build full logits.
        callbacks (`list` of [`~transformers.TrainerCallback`], *optional*):
            Callbacks to use during training.
        optimizers (`tuple` of `torch.optim.Optimizer` and `torch.optim.lr_scheduler.LambdaLR`, *optional*, defaults to `(None, None)`):
            Optimizer and scheduler.
        preprocess_logits_for_metrics (`Callable`, *optional*):
            As in [`~transformers.Trainer`].
        peft_config ([`~peft.PeftConfig`], *optional*):
            Train a PEFT adapter on the student instead of all its weights.
        formatting_func (`Callable`, *optional*):
            As in TRL's `SFTTrainer`.
    """

    _tag_names = ["trl", "gkd", "eopd"]
    _name = "EOPD"
    _paper = {
        "title": "Entropy-Aware On-Policy Distillation of Language Models",
        "id": "2603.07079",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{jin2026entropy,
                title        = {{Entropy-Aware On-Policy Distillation of Language Models}},
                author       = {Jin and Min and Yang and Kadhe and Zhou and Wei and Baracaldo and Lee},
                year         = 2026,
                journal      = {arXiv preprint arXiv:2603.07079},
            }"""),
    }
    # Every training loss we return is already divided by the token count of the whole accumulation window.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str = None,
        args: EOPDConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR] = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable | None = None,
    ):
        if not isinstance(args, EOPDConfig):
            raise TypeError(
                f"`args` must be an `EOPDConfig`, got {type(args).__name__}. `EOPDConfig` takes every `GKDConfig` "
                "argument, so replacing the class name is enough."
            )
        # Before any model loads: processes that would train apart, or a sharding the loss cannot read.
        launch_error = launch_problem(_distributed_state(args))
        if launch_error is not None:
            raise ValueError(launch_error)
        served_teacher_url = args.teacher_model_server_url
        if served_teacher_url is not None and not (teacher_model is None or isinstance(teacher_model, str)):
            raise ValueError(
                "`teacher_model` must be None or a name when `args.teacher_model_server_url` is set: the served model "
                f"at {served_teacher_url} is the teacher, and a second one in this process would only take memory."
            )
        if served_teacher_url is not None and compute_metrics is not None:
            raise ValueError(
                "`compute_metrics` needs full logits of both models, which a served teacher does not give; drop it, "
                "or train with a local teacher (`args.teacher_model_server_url=None`)."
            )
        if teacher_model is None and served_teacher_url is None:
            raise ValueError(
                "`teacher_model` is required: pass a model or a Hub id / local path, or serve the teacher with vLLM "
                "and set `args.teacher_model_server_url`."
            )
        check_model_path(model, "model")
        if served_teacher_url is None:
            check_model_path(teacher_model, "teacher_model")
        check_not_empty(train_dataset, "train_dataset")
        check_not_empty(eval_dataset, "eval_dataset")
        if data_collator is None:
            _check_processing_class(processing_class)
            check_dataset_columns(train_dataset, "train_dataset")
            check_dataset_columns(eval_dataset, "eval_dataset")
            # TRL's ChatML collator would cut long prompts from the left, silently; this one keeps them whole.
            data_collator = PromptKeepingChatMLCollator(tokenizer=processing_class, max_length=args.max_length)

        served_teacher_name = teacher_model if served_teacher_url is not None else None
        teacher_model_init_kwargs = args.teacher_model_init_kwargs
        if served_teacher_url is not None:
            args.teacher_model_init_kwargs = None  # nothing is loaded; GKD would refuse them next to the stand-in
        with (
            _compat.without_gkd_migration_advice(),
            _compat.gkd_init_without_teacher(),
            _compat.peft_wrapping_without_checkpointing_warnings(),
        ):
            super().__init__(
                model=model,
                teacher_model=teacher_model if served_teacher_url is None else _compat.served_teacher_stand_in(self),
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                peft_config=peft_config,
                formatting_func=formatting_func,
            )

        args.teacher_model_init_kwargs = teacher_model_init_kwargs
        # GKD's rollout asks generate() for a dict output; the config says so itself (_compat.GenerationConfigOnly).
        self.generation_config.return_dict_in_generate = True
        self.loss_options = args.loss_options
        # Per mode, the float64 sums of `EOPDStats` over every process since the last log (see `log`).
        self._eopd_sums: dict[str, torch.Tensor] = {}
        self._warned_empty_window_at_step = None
        self._forward_redirection = _compat.forward_redirection()
        self._memory_efficient = args.memory_efficient_loss
        self._projection_verified = False
        self._student_eos_to_replace, self._teacher_eos_id = self._configure_teacher_eos(args.teacher_eos_token)
        self._teacher_server = None
        self._stats_class = EOPDStats
        if served_teacher_url is not None:
            from .teacher_routing import connect_served_teachers

            self.teacher_model = None  # GKD prepared a parameter-free stand-in; nothing of the teacher lives here
            self._teacher_server, self._stats_class = connect_served_teachers(
                args,
                student_vocab_size=self.model.config.get_text_config().vocab_size,
                teacher_name=served_teacher_name,
                datasets={"train_dataset": train_dataset, "eval_dataset": eval_dataset},
            )
        # Where on-policy completions come from (`generate`, a colocated engine, or a server); see `trl_eopd/rollouts`.
        self._rollouts = build_rollout_source(self)
        # A source that samples ahead finishes each window (end tokens, a served teacher's log-probs) in its
        # background thread, so that the training loop only runs the student's forward and backward.
        self._rollouts.finish_window = self._finish_rollouts

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # transformers starts accelerate's gradient accumulation at 1 (the Trainer accumulates itself) and writes the
        # real count into the DeepSpeed config; accelerate, preparing the model, finds the two differ, logs a mismatch
        # and takes DeepSpeed's value. Under DeepSpeed accelerate never divides the loss by its count (the engine
        # does) and the Trainer never enters `accelerator.accumulate`: giving it that value up front changes nothing
        # but the spurious log.
        if self.is_deepspeed_enabled:
            self.accelerator.gradient_accumulation_steps = self.args.gradient_accumulation_steps

    # ----------------------------------------------------------------------------------------------------------------
    # Generation

    def _configure_teacher_eos(self, teacher_eos_token: str | None) -> tuple[torch.Tensor | None, int | None]:
        if teacher_eos_token is None:
            return None, None
        tokenizer = _tokenizer_of(self.processing_class)
        teacher_eos_id = tokenizer.convert_tokens_to_ids(teacher_eos_token)
        if teacher_eos_id is None or teacher_eos_token not in tokenizer.get_vocab():
            raise ValueError(
                f"`teacher_eos_token={teacher_eos_token!r}` is not a token of the student's tokenizer; it must be a "
                "single token both models share, such as '<|im_end|>' for Qwen3."
            )
        student_eos = self.generation_config.eos_token_id
        if student_eos is None:
            student_eos = tokenizer.eos_token_id
        student_eos = [student_eos] if isinstance(student_eos, int) else list(student_eos or [])
        # Completions stop at either model's end token.
        self.generation_config.eos_token_id = sorted(set(student_eos) | {teacher_eos_id})
        to_replace = [token for token in student_eos if token != teacher_eos_id]
        return (torch.tensor(to_replace, dtype=torch.long) if to_replace else None), teacher_eos_id

    def _replace_student_eos(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if self._student_eos_to_replace is None:
            return
        # Only scored completion tokens change: prompts and padding (pad may equal EOS on base models) stay as they are.
        at_student_eos = torch.isin(input_ids, self._student_eos_to_replace.to(input_ids.device)) & (
            labels != IGNORE_INDEX
        )
        input_ids[at_student_eos] = self._teacher_eos_id
        labels[at_student_eos] = self._teacher_eos_id

    def _roll_out_window(self, batches: list[dict]) -> list[dict]:
        rolled_out = self._rollouts.roll_out_window(
            batches, global_step=self.state.global_step, lmbda=self.lmbda, measure_mismatch=self._logs_next_step()
        )
        return self._finish_rollouts(batches, rolled_out)

    def _finish_rollouts(self, batches: list[dict], rolled_out: list[dict], global_step: int | None = None):
        """Rewrite end tokens, mark the window rolled out and fetch a served teacher's log-probs; a source that samples
        ahead calls this in its background thread (then `global_step` is the step the window will feed), and the
        trainer again when the window trains, which then finds nothing left to do."""
        for batch in rolled_out:
            if batch.get(_ROLLOUT_DONE):
                continue
            sampled_labels = batch["labels"].clone() if SAMPLER_LOGPROBS in batch else None
            self._replace_student_eos(batch["input_ids"], batch["labels"])
            if sampled_labels is not None:
                batch[SAMPLER_LOGPROBS] = without_rewritten_tokens(batch[SAMPLER_LOGPROBS], sampled_labels,
                                                                   batch["labels"])  # fmt: skip
        for batch in batches:
            batch[_ROLLOUT_DONE] = True
        missing_teacher = [batch for batch in batches if _SERVED_TEACHER not in batch]
        if self._teacher_server is not None and missing_teacher:
            self._fetch_served_teacher(missing_teacher, global_step)
        return batches

    def _fetch_served_teacher(self, batches: list[dict], global_step: int | None = None) -> None:
        # One request per process for its whole window: the server batches the processes' concurrent requests
        # itself, and nothing has to be gathered to one process and scattered back (two collectives, and a single
        # process's network link carrying every process's log-probs).
        step = self.state.global_step if global_step is None else global_step
        fetched = self._teacher_server.fetch(batches, step)
        for batch, teacher in zip(batches, fetched, strict=True):
            batch[_SERVED_TEACHER] = teacher.to(batch["input_ids"].device)

    def _logs_next_step(self) -> bool:
        """Whether the optimizer step being prepared will be logged (only then does vLLM return log-probs)."""
        upcoming = self.state.global_step + 1
        if self.args.logging_first_step and upcoming == 1:
            return True
        logging_steps = getattr(self.state, "logging_steps", None) or self.args.logging_steps
        return self.args.logging_strategy == "steps" and bool(logging_steps) and upcoming % logging_steps == 0

    @staticmethod
    def _count_loss_tokens(batches: list[dict]) -> torch.Tensor:
        return sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch an accumulation window, roll out every micro-batch, and count the tokens that will enter the loss.

        transformers counts `num_items_in_batch` on the dataset's labels, before on-policy generation replaces them;
        generating here, for the whole window at once, lets the count cover the completions actually trained on.
        """

        def fetch() -> list[dict]:
            batch_samples, _ = super(EOPDTrainer, self).get_batch_samples(epoch_iterator, num_batches, device)
            # A resumed run must sample what an uninterrupted one would: the rollouts are the first random draws.
            self._restore_rng_before_rollouts()
            return [send_to_device(batch, self.accelerator.device) for batch in batch_samples]

        # The rollout source reads the window itself: an asynchronous one reads the next windows ahead.
        batch_samples, rolled_out = self._rollouts.next_window(
            fetch, epoch_key=epoch_iterator, global_step=self.state.global_step, lmbda=self.lmbda,
            measure_mismatch=self._logs_next_step(),
        )  # fmt: skip
        batch_samples = self._finish_rollouts(batch_samples, rolled_out)
        local_count = (self._count_loss_tokens(batch_samples) if batch_samples else torch.tensor(0, device=device)).to(
            device
        )
        return batch_samples, self.accelerator.reduce(local_count, reduction="sum")

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not inputs.pop(_ROLLOUT_DONE, False):
            # Reached outside the Trainer's loop (a custom loop, a benchmark): roll out now and count locally.
            inputs = self._roll_out_window([send_to_device(inputs, self.accelerator.device)])[0]
            inputs.pop(_ROLLOUT_DONE)
            num_items_in_batch = (
                self._count_loss_tokens([inputs]) * self.current_gradient_accumulation_steps
            ) * self.accelerator.num_processes
        # GKDTrainer.training_step would generate again; its parent runs the forward/backward we want.
        return _compat.training_step_without_gkd_rollout(self, model, inputs, num_items_in_batch)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if mode == "train" and num_items_in_batch is not None:
            self._warn_if_window_is_empty(num_items_in_batch)
            # DDP and DeepSpeed average gradients over processes, so each process divides by its share of the global
            # count; the average then equals the global per-token mean.
            num_items_in_batch = num_items_in_batch / self.accelerator.num_processes
        # In eval mode a given count (from a caller summing a loss over batches) divides the summed loss as is, as in
        # GKD. The Trainer's own evaluation (TRL's `SFTTrainer.prediction_step`) passes none: per-batch token means,
        # which `evaluation_loop` replaces by the mean over every token of the evaluation.
        options = self._loss_options_for(mode)

        # vLLM's log-probs of the sampled tokens (a colocated engine's on logged steps, a server's always; see
        # `trl_eopd/rollouts`): the loss hands back the student's log-probs of the same tokens, so the mismatch and the
        # importance ratios of stale tokens cost no extra forward pass.
        sampler_logprobs = inputs.pop(SAMPLER_LOGPROBS, None)
        target_log_probs = importance = None
        if sampler_logprobs is not None:
            loss_mask = inputs["labels"][:, 1:] != IGNORE_INDEX
            target_log_probs = torch.empty(int(loss_mask.sum()), dtype=torch.float32, device=loss_mask.device)
        # Rollouts sampled by older weights (server mode, `max_staleness >= 1`): see `trl_eopd/loss/importance.py`.
        if inputs.pop(ROLLOUT_STALENESS, 0) > 0 and sampler_logprobs is not None:
            sampler = torch.tensor(sampler_logprobs, dtype=torch.float32, device=target_log_probs.device)
            importance = ImportanceCorrection(sampler, self.args.importance_ratio_cap)

        outputs = None
        if self._teacher_server is not None:
            loss, stats, diagnose = self._served_teacher_loss(
                model, inputs, num_items_in_batch, options, target_log_probs, importance
            )
            if mode == "eval":
                divisor = stats.num_tokens if num_items_in_batch is None else num_items_in_batch
                loss = evaluation_loss_sum(stats, options.forward_kl_coef) / safe_divisor(divisor, loss.device)
        # Callers that want logits (compute_metrics) get them from the full-logits path.
        elif self._memory_efficient and not return_outputs and self._memory_efficient_is_exact(model, inputs):
            loss, stats, diagnose = self._memory_efficient_loss(
                model, inputs, num_items_in_batch, options, target_log_probs, importance
            )
        else:
            loss, stats, diagnose, outputs = self._full_logits_loss(
                model, inputs, num_items_in_batch, options, target_log_probs, importance
            )
        self._record_metrics(mode, loss, stats, diagnose)
        if sampler_logprobs is not None:
            self._rollouts.record_mismatch(sampler_logprobs, target_log_probs)
        if importance is not None and self.loss_options.reverse_kl_estimator == "sampled":
            self._rollouts.record_importance_ratios(importance, target_log_probs)
        return (loss, outputs) if return_outputs else loss

    def _full_logits_loss(self, model, inputs, num_items_in_batch, options, target_log_probs_out=None,
                          importance=None):  # fmt: skip
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher_model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        student_logits = student_outputs.logits[:, :-1]
        teacher_logits = teacher_outputs.logits[:, :-1]
        loss, stats = eopd_loss_and_stats(
            student_logits,
            teacher_logits,
            inputs["labels"][:, 1:],
            options,
            num_items_in_batch=num_items_in_batch,
            target_log_probs_out=target_log_probs_out,
            importance=importance,
        )

        def diagnose():
            return _non_finite_report(
                student=lambda: (~torch.isfinite(student_logits)).any(-1).sum().item(),
                teacher=lambda: (~torch.isfinite(teacher_logits)).any(-1).sum().item(),
            )

        return loss, stats, diagnose, student_outputs

    def _served_teacher_loss(self, model, inputs, num_items_in_batch, options, target_log_probs_out=None,
                             importance=None):  # fmt: skip
        if _SERVED_TEACHER not in inputs:  # evaluation batches, or a batch built outside the training loop
            self._fetch_served_teacher([inputs])
        if not self._memory_efficient_is_exact(model, inputs):
            raise ValueError(
                "The student's logits are not a plain projection of its last hidden state (see the warning above), "
                "and the served-teacher loss is only computed from hidden states. Train with a local teacher instead."
            )
        unwrapped_student = self.accelerator.unwrap_model(model)
        return self._forward_redirection(
            model, unwrapped_student, self._project_and_score_served, unwrapped_student, inputs, num_items_in_batch,
            options, target_log_probs_out, importance,
        )  # fmt: skip

    def _project_and_score_served(self, student, inputs, num_items_in_batch, options, target_log_probs_out=None,
                                  importance=None):  # fmt: skip
        from .loss.served import served_teacher_eopd_loss_and_stats
        from .teacher_routing import RoutedTeacherLogProbs, routed_teacher_eopd_loss_and_stats

        shifted_labels = inputs["labels"][:, 1:]
        loss_mask = shifted_labels != IGNORE_INDEX
        teacher = inputs.pop(_SERVED_TEACHER)
        student_hidden = last_hidden_state(student, inputs["input_ids"], inputs["attention_mask"])[:, :-1][loss_mask]
        projection = gathered(find_output_projection(student)[0])
        if isinstance(teacher, RoutedTeacherLogProbs):
            teacher_args = (teacher,)
            loss_function = functools.partial(
                routed_teacher_eopd_loss_and_stats, teacher_ids=self._teacher_server.teacher_ids,
                entropy_thresholds=self._teacher_server.entropy_thresholds,
            )  # fmt: skip
        else:
            # The exact entropy where the server's plugin gives it.
            teacher_args = (teacher.top_log_probs, teacher.top_ids, teacher.target_log_probs)
            loss_function = functools.partial(served_teacher_eopd_loss_and_stats, teacher_entropy=teacher.entropy)
        with maybe_gather_lm_head_ctx(projection.weight, projection.bias):
            loss, stats = loss_function(
                student_hidden,
                projection.weight,
                shifted_labels[loss_mask],
                *teacher_args,
                student_bias=projection.bias,
                student_logit_scale=projection.logit_scale,
                student_softcap=projection.softcap,
                vocab_size=self._teacher_server.vocab_size,
                options=options,
                entropy_estimate=self.args.teacher_entropy_estimate,
                num_items_in_batch=num_items_in_batch,
                chunk_size=self.args.loss_chunk_size,
                target_log_probs_out=target_log_probs_out,
                importance=importance,
            )

        def diagnose():
            student_hidden_detached = student_hidden.detach()
            return _non_finite_report(
                student=lambda: count_non_finite_rows(student_hidden_detached, projection), teacher=lambda: 0
            )

        return loss, stats, diagnose

    def _memory_efficient_loss(self, model, inputs, num_items_in_batch, options, target_log_probs_out=None,
                               importance=None):  # fmt: skip
        # Run inside the student wrapper's forward, so DDP arms its gradient hooks and ZeRO-3 keeps the student's
        # sharded parameters, lm_head included, available for the projection.
        unwrapped_student = self.accelerator.unwrap_model(model)
        return self._forward_redirection(
            model, unwrapped_student, self._project_and_score, unwrapped_student, inputs, num_items_in_batch, options,
            target_log_probs_out, importance,
        )  # fmt: skip

    def _project_and_score(self, student, inputs, num_items_in_batch, options, target_log_probs_out=None,
                           importance=None):  # fmt: skip
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        shifted_labels = inputs["labels"][:, 1:]
        loss_mask = shifted_labels != IGNORE_INDEX
        targets = shifted_labels[loss_mask]

        student_hidden = last_hidden_state(student, input_ids, attention_mask)[:, :-1][loss_mask]
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
            )[:, :-1][loss_mask]

        # Full tensors once per call under FSDP2 (the teacher's head was resharded when its forward returned).
        student_projection = gathered(find_output_projection(student)[0])
        teacher_projection = gathered(find_output_projection(unwrapped_teacher)[0])
        with (
            maybe_gather_lm_head_ctx(student_projection.weight, student_projection.bias),
            maybe_gather_lm_head_ctx(teacher_projection.weight, teacher_projection.bias),
        ):
            loss, stats = chunked_eopd_loss_and_stats(
                student_hidden,
                student_projection.weight,
                teacher_hidden.to(teacher_projection.weight.device),
                teacher_projection.weight,
                targets,
                student_bias=student_projection.bias,
                teacher_bias=teacher_projection.bias,
                student_logit_scale=student_projection.logit_scale,
                teacher_logit_scale=teacher_projection.logit_scale,
                student_softcap=student_projection.softcap,
                teacher_softcap=teacher_projection.softcap,
                options=options,
                num_items_in_batch=num_items_in_batch,
                chunk_size=self.args.loss_chunk_size,
                target_log_probs_out=target_log_probs_out,
                importance=importance,
            )

        def diagnose():
            student_hidden_detached = student_hidden.detach()
            return _non_finite_report(
                student=lambda: count_non_finite_rows(student_hidden_detached, student_projection),
                teacher=lambda: count_non_finite_rows(teacher_hidden, teacher_projection),
            )

        return loss, stats, diagnose

    def _memory_efficient_is_exact(self, model, inputs) -> bool:
        """Decide once whether projecting hidden states ourselves reproduces both models' logits.

        The output layer must be a plain linear layer, and the model's own logits must equal
        `softcap(scale * (hidden @ W.T + b))` on a real sequence, which catches scalings that a config does not
        announce. Every process must take the same path (ZeRO-3 collectives follow the modules called), so the
        verdict is agreed across processes.
        """
        if self._projection_verified or not self._memory_efficient:
            return self._memory_efficient
        reasons = []
        roles = [("student", model, self.accelerator.unwrap_model(model))]
        if self.teacher_model is not None:  # a served teacher's projection is the server's business
            roles.append(("teacher", self.teacher_model, self.accelerator.unwrap_model(self.teacher_model)))
        for role, wrapped, unwrapped in roles:
            projection, reason = find_output_projection(unwrapped)
            if projection is None:
                reasons.append(f"the {role}'s output layer cannot be projected directly ({reason})")
                continue
            mismatch = self._projection_mismatch(wrapped, unwrapped, projection, inputs)
            if mismatch:
                reasons.append(f"the {role}'s logits are not a plain projection of its last hidden state ({mismatch})")
        agreed = torch.tensor([0.0 if reasons else 1.0], device=self.accelerator.device)
        agreed = self.accelerator.gather(agreed).min().item() > 0
        if not agreed:
            why = "; ".join(reasons) or "another process found the output layer unsuitable"
            warnings.warn(
                f"EOPDTrainer: `memory_efficient_loss` falls back to the exact full-logits path because {why}. "
                "The loss is unchanged; only memory use grows.",
                stacklevel=2,
            )
        self._memory_efficient = agreed
        self._projection_verified = True
        if agreed:
            self._register_output_layers_with_zero3(model)
        return agreed

    def _register_output_layers_with_zero3(self, model) -> None:
        """Let ZeRO-3 gather each output layer for its model's whole forward and backward.

        The chunked loss reads `lm_head.weight` without calling the `lm_head` module, so ZeRO-3's module hooks never
        gather it; above all, nothing would re-gather it in the backward pass, where its gradient must be
        accumulated on the full weight. Registered as an external parameter of the model, it is gathered with the
        model's own forward and backward (the loss runs inside them, see `_memory_efficient_loss`).
        """
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            return
        import deepspeed

        for wrapped in (model, self.teacher_model):
            if wrapped is None:
                continue
            unwrapped = self.accelerator.unwrap_model(wrapped)
            projection, _ = find_output_projection(unwrapped)
            for parameter in (projection.weight, projection.bias):
                if parameter is not None:
                    deepspeed.zero.register_external_parameter(unwrapped, parameter)

    def _projection_mismatch(self, wrapped, unwrapped, projection: OutputProjection, inputs) -> str:
        input_ids, attention_mask = inputs["input_ids"][:1], inputs["attention_mask"][:1]
        with torch.no_grad():
            reference = wrapped(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            if is_fsdp2_sharded(unwrapped):
                # Inside the model's forward, as the loss runs: FSDP2 gathers the embedding only there.
                hidden = self._forward_redirection(wrapped, unwrapped, last_hidden_state, unwrapped, input_ids,
                                                   attention_mask)  # fmt: skip
            else:
                hidden = last_hidden_state(unwrapped, input_ids, attention_mask)
            projection = gathered(projection)
            with maybe_gather_lm_head_ctx(projection.weight, projection.bias):
                ours = project(hidden.float(), projection).float()
        if ours.shape != reference.shape:
            return f"shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
        error = (ours - reference).abs().max().item()
        tolerance = 1e-2 * reference.abs().max().item() + 1e-3
        return "" if error <= tolerance else f"max abs difference {error:.3g} > {tolerance:.3g}"

    # ----------------------------------------------------------------------------------------------------------------
    # Metrics

    def _record_metrics(self, mode: str, loss: torch.Tensor, stats: EOPDStats, diagnose) -> None:
        # One collective carries every statistic and the loss; the loss's finiteness is read from the same transfer,
        # so a healthy step pays nothing extra to be checked.
        packed = torch.cat([stats.to_tensor(), loss.detach().to(torch.float64).reshape(1)]).to(self.accelerator.device)
        gathered = self.accelerator.gather(packed.unsqueeze(0))
        if not torch.isfinite(gathered[:, -1]).all():
            local_loss_finite = bool(torch.isfinite(loss.detach()))
            detail = "another process's loss is non-finite" if local_loss_finite else diagnose()
            raise FloatingPointError(
                f"EOPD loss is non-finite at global step {self.state.global_step} ({mode}): {detail}. Lower the "
                "learning rate, check the models' dtypes (fp16 overflows easily; prefer bf16), or inspect the data."
            )
        # Sums, not means: every token since the last log weighs the same, whatever the micro-batch it came in, so
        # the logged values do not depend on the batch size, the accumulation steps or the number of processes.
        totals = gathered[:, :-1].sum(0)
        previous = self._eopd_sums.get(mode)
        self._eopd_sums[mode] = totals if previous is None else previous + totals

    def _warn_if_window_is_empty(self, num_items_in_batch) -> None:
        if self._warned_empty_window_at_step == self.state.global_step or float(num_items_in_batch) != 0:
            return
        self._warned_empty_window_at_step = self.state.global_step
        warnings.warn(
            f"EOPDTrainer: the gradient-accumulation window of step {self.state.global_step + 1} has no completion "
            "token on any process (every completion is empty, e.g. generation stopped at once or `max_length` left "
            "no room after the prompt). Its loss is 0 and its gradients are 0.",
            stacklevel=3,
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the `eopd/*` means over every token since the last log, then log as TRL does."""
        mode = "train" if self.model.training else "eval"
        sums = self._eopd_sums.pop(mode, None)
        if sums is not None:
            stats = self._stats_class.from_tensor(sums.cpu())
            if mode == "eval":
                prefix = metric_prefix(logs)
                _, means = evaluation_means(stats, self.loss_options.forward_kl_coef)
            else:
                prefix, means = "", stats.means()
            logs.update({prefix + name: value for name, value in means.items()})
        if mode == "train":
            logs.update(self._rollouts.pop_metrics())
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._rollouts.finish_training(self.state.global_step)
        return output

    def end(self):
        """Close the rollout source (a colocated vLLM engine), then finish as [`~transformers.Trainer.end`] does."""
        # A colocated engine made process groups inside the training world; torn down after `end()` destroyed that
        # world, at interpreter exit, vLLM would print an "Invalid process group" traceback.
        self._rollouts.close()
        super().end()


def _non_finite_report(student: Callable[[], int], teacher: Callable[[], int]) -> str:
    bad_student, bad_teacher = student(), teacher()
    parts = []
    if bad_student:
        parts.append(f"the student's logits are non-finite at {bad_student} loss position(s)")
    if bad_teacher:
        parts.append(f"the teacher's logits are non-finite at {bad_teacher} loss position(s)")
    if not parts:
        return "both models' logits are finite, so the divergence itself overflowed (check `temperature`)"
    return " and ".join(parts)
