"""One check per entry of `trl_eopd/_compat.py`: what trl-eopd relies on in TRL's, transformers' and argparse's private
internals still holds. A failure names the entry to revisit after an upgrade (the vLLM entry is checked in
`tests/vllm_engine/test_compat_vllm.py`)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import re
import warnings

import pytest
import torch
from torch import nn

from trl_eopd import _compat


def _gkd_trainer():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer


def test_forward_redirection_runs_the_method_inside_the_wrapper_forward():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    inner = nn.Linear(2, 2)
    wrapper = Wrapper(inner)
    original_forward = inner.forward
    out = _compat.forward_redirection()(wrapper, inner, lambda x: x * 3, torch.ones(2))
    assert wrapper.calls == 1 and torch.equal(out, torch.full((2,), 3.0)), (
        "_compat.forward_redirection: TRL's _ForwardRedirection no longer runs the method inside the wrapper's forward"
    )
    assert inner.forward == original_forward, "_compat.forward_redirection: the inner module's forward is left patched"


def test_gkd_training_step_still_rolls_out_and_its_parent_runs_the_step():
    gkd = _gkd_trainer()
    source = inspect.getsource(gkd.training_step)
    # If GKD stopped sampling inside training_step, EOPDTrainer could call it directly instead of skipping it.
    assert "generate_on_policy_outputs" in source, (
        "_compat.training_step_without_gkd_rollout: GKDTrainer.training_step no longer samples completions; "
        "EOPDTrainer may call super().training_step again."
    )
    parent_step = super(gkd, gkd).training_step
    params = list(inspect.signature(parent_step).parameters)
    assert params[:1] == ["self"] and ("num_items_in_batch" in params or "kwargs" in params), (
        f"_compat.training_step_without_gkd_rollout: the parent of GKDTrainer has training_step{tuple(params)}, "
        "not (model, inputs, num_items_in_batch)."
    )


def test_transformers_restores_rng_after_get_batch_samples():
    from transformers import Trainer

    assert callable(getattr(Trainer, "_load_rng_state", None)), (
        "_compat.RestoresRngBeforeRollouts: transformers' Trainer has no `_load_rng_state` any more."
    )
    assert list(inspect.signature(Trainer._load_rng_state).parameters) == ["self", "checkpoint"]
    assert list(inspect.signature(Trainer.train).parameters)[1] == "resume_from_checkpoint"
    # The method holding the epoch's loop (`_run_epoch` in transformers 5.24) fetches a window, then restores.
    loops = [inspect.getsource(m) for _, m in inspect.getmembers(Trainer, inspect.isfunction)]
    loops = [src for src in loops if "self.get_batch_samples(" in src]
    assert any("self._load_rng_state(" in src[src.index("self.get_batch_samples(") :] for src in loops), (
        "_compat.RestoresRngBeforeRollouts: transformers no longer restores the random state after "
        "`get_batch_samples`; check where it does now and whether restoring it before the rollouts is still needed."
    )


def test_gkd_migration_advice_is_the_only_record_of_the_logger_kept_quiet(caplog):
    gkd_module = inspect.getmodule(_gkd_trainer())
    assert gkd_module.__name__ == _compat.GKD_LOGGER, (
        f"_compat.without_gkd_migration_advice: GKDTrainer now lives in {gkd_module.__name__}, not "
        f"{_compat.GKD_LOGGER}; its advice would show again."
    )
    calls = len(
        re.findall(
            r"\blogger\.(?:debug|info|warning|warn|error|exception|critical|log)\(", inspect.getsource(gkd_module)
        )
    )
    assert calls == 1 and "DistillationTrainer" in inspect.getsource(_gkd_trainer().__init__), (
        "_compat.without_gkd_migration_advice: the GKD trainer's logger no longer logs exactly the migration advice "
        f"({calls} logger calls); keeping it to errors while GKDTrainer is built could hide a new message, or the "
        "advice is gone and the switch can go."
    )
    logger = logging.getLogger(_compat.GKD_LOGGER)
    with caplog.at_level(logging.WARNING, logger=_compat.GKD_LOGGER):
        with _compat.without_gkd_migration_advice():
            logger.warning("Consider migrating to DistillationTrainer.")
            logger.error("an error still shows")
        logger.warning("after the block, warnings show again")
    assert [r.getMessage() for r in caplog.records] == ["an error still shows", "after the block, warnings show again"]


def test_trl_vllm_version_warning_is_all_its_check_warns_and_the_quiet_check_answers_alike(monkeypatch):
    import trl.import_utils as trl_imports

    entry = "_compat.trl_vllm_version_check_quiet"
    _compat.trl_vllm_version_check_quiet()
    quiet = trl_imports.is_vllm_available
    loud = quiet.__wrapped__
    # A vLLM past any range TRL lists (this environment has none; tests/vllm_engine/ checks the installed one).
    found = trl_imports._is_package_available
    monkeypatch.setattr(trl_imports, "_is_package_available",
                        lambda name, return_version=False: (True, "999.0.0") if name == "vllm"
                        else found(name, return_version))  # fmt: skip
    for min_version in (None, "998.0", "1000.0"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            answer = loud(min_version)
        assert caught, f"{entry}: TRL no longer warns of a vLLM outside its range; the entry can go."
        assert [w.category for w in caught] == [UserWarning] and "999.0.0" in str(caught[0].message), (
            f"{entry}: TRL's is_vllm_available now warns otherwise ({[str(w.message) for w in caught]}); ignoring "
            "its UserWarnings could hide something the user can act on."
        )
        assert answer is (min_version != "1000.0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert quiet(min_version) is answer and not caught, (min_version, caught)
    _compat.trl_vllm_version_check_quiet()
    assert trl_imports.is_vllm_available is quiet, f"{entry}: not idempotent"


def test_chat_template_variables_fixed_in_the_template_win():
    from trl_eopd.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% if flag is defined and flag is false %}OFF{% else %}ON{% endif %}"
    _compat.fix_chat_template_variables(tokenizer, {"flag": False})
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert rendered == "OFF", (
        f"_compat.fix_chat_template_variables: transformers rendered {rendered!r}; a top-level Jinja `set` no longer "
        "fixes a template variable."
    )


def test_argparse_help_can_be_regrouped():
    parser = argparse.ArgumentParser(prog="p", usage="p")
    for name in ("late", "early"):
        parser.add_argument(f"--{name}")
    for attribute in ("_actions", "_action_groups"):
        assert isinstance(getattr(parser, attribute, None), list), f"_compat.regroup_help: argparse lost {attribute}"
    _compat.regroup_help(parser, [("first", {"early"}), ("rest", None)])
    text = parser.format_help()
    assert text.index("first:") < text.index("--early") < text.index("rest:") < text.index("--late"), text


def test_trl_model_cards_read_the_trainer_class_attributes():
    from trl_eopd import EOPDTrainer

    source = inspect.getsource(_gkd_trainer().create_model_card)
    for attribute in ("_tag_names", "_name", "_paper"):
        assert f"self.{attribute}" in source, f"EOPDTrainer.{attribute}: TRL's create_model_card no longer reads it."
        assert attribute in vars(EOPDTrainer)


def test_trl_still_toggles_checkpointing_through_the_deprecated_names():
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.models.utils import unwrap_model_for_generation

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    model.activation_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with unwrap_model_for_generation(model, Accelerator(cpu=True)):
            pass
    raised_in = {w.filename for w in caught if w.category is FutureWarning and "checkpointing" in str(w.message)}
    assert raised_in, (
        "_compat.unwrap_model_for_generation: TRL's unwrap_model_for_generation no longer warns about transformers' "
        "checkpointing names; EOPDTrainer can call it directly again."
    )
    import transformers.modeling_utils

    assert raised_in == {transformers.modeling_utils.__file__}, (
        f"_compat.unwrap_model_for_generation: the checkpointing FutureWarnings now come from {raised_in}, not "
        "transformers.modeling_utils; the module filter would miss them."
    )


def test_gkd_rollout_still_passes_return_dict_in_generate_as_an_argument():
    source = inspect.getsource(_gkd_trainer().generate_on_policy_outputs)
    assert "generation_config=generation_config" in source and "return_dict_in_generate=True" in source, (
        "_compat.GenerationConfigOnly: GKD's generate_on_policy_outputs no longer passes return_dict_in_generate next "
        "to its generation config; EOPDTrainer can hand it the model itself."
    )
    assert ".generate(" in source and "model." in source


def test_deepspeed_shm_op_still_prints_from_the_function_the_backend_calls():
    pytest.importorskip("deepspeed")
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    assert "print(" in inspect.getsource(ds_torch.build_shm_op), (
        "_compat.deepspeed_shm_op_built_quietly: DeepSpeed's build_shm_op no longer prints; the wrapper can go."
    )
    assert "build_shm_op()" in inspect.getsource(ds_torch.TorchBackend.__init__), (
        "_compat.deepspeed_shm_op_built_quietly: DeepSpeed's torch backend no longer builds its op through the "
        "module's build_shm_op, so wrapping that name no longer silences it."
    )


def test_deepspeed_backend_still_holds_torch_deprecated_collectives():
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    backend = importlib.import_module("deepspeed.comm.torch").TorchBackend
    held = [
        (backend.get_all_gather_function(), "all_gather_into_tensor", "all_gather_single"),
        (backend.get_reduce_scatter_function(), "reduce_scatter_tensor", "reduce_scatter_single"),
    ]
    for function, old, new in held:
        assert function is getattr(dist, old), (
            f"_compat.deepspeed_collectives_by_current_torch_names: DeepSpeed no longer holds "
            f"torch.distributed.{old}; the entry can go."
        )
        assert callable(getattr(dist, new, None)), (
            f"_compat.deepspeed_collectives_by_current_torch_names: torch.distributed.{new} is gone."
        )
        assert (
            list(inspect.signature(getattr(dist, new)).parameters)[:2]
            == list(inspect.signature(function).parameters)[:2]
        ), f"_compat.deepspeed_collectives_by_current_torch_names: {new} takes other arguments than {old}."


@pytest.mark.parametrize(
    "name",
    [
        "forward_redirection",
        "training_step_without_gkd_rollout",
        "unwrap_model_for_generation",
        "GenerationConfigOnly",
        "deepspeed_shm_op_built_quietly",
        "deepspeed_collectives_by_current_torch_names",
        "trl_vllm_version_check_quiet",
    ],
)
def test_compat_entries_exist(name):
    assert callable(getattr(_compat, name))


def test_trl_formats_a_completion_choice_into_top_logprobs_ids_and_the_actual_token():
    # A vLLM `/v1/completions` choice for the prompt [5, 7, 9] with prompt_length 1 and top_logprobs 2: position 1's
    # actual token is in its top-2, position 2's is not (vLLM adds it as a third entry).
    choice = {"prompt_logprobs": [
        None,
        {"7": {"logprob": -0.5, "rank": 1}, "3": {"logprob": -1.5, "rank": 2}},
        {"4": {"logprob": -0.1, "rank": 1}, "2": {"logprob": -3.0, "rank": 2}, "9": {"logprob": -6.0, "rank": 40}},
    ]}  # fmt: skip
    formatted = _compat.format_sequence_logprobs(choice, [5, 7, 9], 1, 2)
    assert formatted["logprobs"] == [[-0.5, -1.5], [-0.1, -3.0]], (
        "_compat.format_sequence_logprobs: TRL's VLLMClient._format_sequence_logprobs no longer returns the top-k "
        "log-probs sorted by rank and cut to top_logprobs"
    )
    assert formatted["logprob_token_ids"] == [[7, 3], [4, 2]]
    assert formatted["actual_logprobs"] == [[-0.5], [-6.0]], (
        "_compat.format_sequence_logprobs: the actual token's log-prob is no longer read whatever its rank"
    )


def test_gkd_init_prepares_the_teacher_through_its_module_level_prepare_deepspeed():
    import trl.experimental.gkd.gkd_trainer as gkd_trainer

    source = inspect.getsource(_gkd_trainer().__init__)
    assert callable(getattr(gkd_trainer, "prepare_deepspeed", None)) and "prepare_deepspeed(teacher_model" in source, (
        "_compat.gkd_init_without_teacher: GKDTrainer.__init__ no longer prepares the teacher with the module-level "
        "`prepare_deepspeed`; find how a served teacher's stand-in can skip it"
    )
    assert "teacher_model.config" in source, (
        "_compat.served_teacher_stand_in: GKDTrainer.__init__ no longer reads the teacher's `config` only"
    )
    sentinel = object()
    with _compat.gkd_init_without_teacher():
        stand_in = _compat.served_teacher_stand_in(type("Trainer", (), {"model": type("M", (), {"config": sentinel})}))
        assert gkd_trainer.prepare_deepspeed(stand_in, None) is stand_in and stand_in.config is sentinel
    assert gkd_trainer.prepare_deepspeed.__name__ == "prepare_deepspeed"  # restored


def test_argparse_still_names_unrecognized_flags_in_its_wording():
    parser = argparse.ArgumentParser(prog="p", allow_abbrev=False)
    parser.add_argument("--seeds")
    messages = []

    def error(message):
        messages.append(message)
        raise SystemExit(2)

    parser.error = error
    with pytest.raises(SystemExit):
        parser.parse_args(["--seed", "3"])
    assert messages and messages[0].startswith(_compat.ARGPARSE_UNRECOGNIZED), (
        f"_compat.ARGPARSE_UNRECOGNIZED: argparse now says {messages}; the did-you-mean hints no longer find flags."
    )
    assert _compat.long_options(parser) == ["--help", "--seeds"]


def test_deepspeed_still_guesses_cpu_out_loud():
    # In a fresh process: DeepSpeed picks its accelerator once, when first imported.
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    guessed = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert guessed.returncode == 0, guessed.stderr[-2000:]
    # DeepSpeed's log handler writes to stdout. That DS_ACCELERATOR=cpu then keeps it quiet is what the README's quick
    # start checks (tests/test_readme.py).
    assert "Setting accelerator to CPU" in guessed.stdout + guessed.stderr, (
        "_compat.tell_deepspeed_when_cpu_only: DeepSpeed no longer warns when it falls back to CPU; the environment "
        "variable is no longer needed to keep it quiet."
    )


def test_peft_still_reads_the_deprecated_checkpointing_name_when_trl_wraps_the_student():
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    sft_trainer = importlib.import_module(_compat._SFT_TRAINER_MODULE)
    assert sft_trainer.get_peft_model is peft.get_peft_model and "get_peft_model(" in inspect.getsource(
        sft_trainer.SFTTrainer.__init__
    ), "_compat.peft_wrapping_without_checkpointing_warnings: TRL's SFTTrainer no longer wraps through get_peft_model."

    def wrap():
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=32,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sft_trainer.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
        return [w for w in caught if w.category is FutureWarning and "checkpointing" in str(w.message)]

    import transformers.modeling_utils

    raised = wrap()
    assert raised, (
        "_compat.peft_wrapping_without_checkpointing_warnings: PEFT no longer reads transformers' deprecated "
        "checkpointing name when wrapping a model; the entry can go."
    )
    assert {w.filename for w in raised} == {transformers.modeling_utils.__file__}, (
        "_compat.peft_wrapping_without_checkpointing_warnings: the warning now comes from elsewhere; the module "
        "filter would miss it."
    )
    with _compat.peft_wrapping_without_checkpointing_warnings():
        assert not wrap()
    assert sft_trainer.get_peft_model is peft.get_peft_model


def test_datasets_json_reader_still_logs_its_error_on_its_module_logger(tmp_path, caplog):
    import datasets

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with caplog.at_level(logging.DEBUG), pytest.raises(datasets.exceptions.DatasetGenerationError):
        datasets.load_dataset("json", data_files=str(bad), split="train", cache_dir=str(tmp_path / "cache"))
    records = [r for r in caplog.records if r.levelno >= logging.ERROR and str(bad) in r.getMessage()]
    assert records and {r.name for r in records} == {_compat.DATASETS_JSON_LOGGER}, (
        "_compat.datasets_json_errors_left_to_the_caller: datasets now reports a malformed JSON file from "
        f"{sorted({r.name for r in records})}, not {_compat.DATASETS_JSON_LOGGER}."
    )
    caplog.clear()
    with _compat.datasets_json_errors_left_to_the_caller(), pytest.raises(datasets.exceptions.DatasetGenerationError):
        datasets.load_dataset("json", data_files=str(bad), split="train", cache_dir=str(tmp_path / "cache2"))
    assert not [r for r in caplog.records if str(bad) in r.getMessage()]
    assert logging.getLogger(_compat.DATASETS_JSON_LOGGER).level == logging.NOTSET
