"""Noise: each known-harmless message is removed at its cause, and every other warning, log record and print passes."""

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_eopd import EOPDConfig, EOPDTrainer, _compat
from trl_eopd.cli.quiet import deepspeed_set_up_quietly, uses_deepspeed
from trl_eopd.tiny import save_tiny_setup

GENERATION_LOGGER = "transformers.generation.utils"
GENERATION_ARGUMENTS_RECORD = "generation-related arguments"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_setup(tmp_path_factory.mktemp("tiny"), num_examples=16)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny["student"])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def generation_records():
    """The generation logger's records, its once-per-process cache emptied so that a repeat is seen again."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    handler, logger = _Records(), logging.getLogger(GENERATION_LOGGER)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _config(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "bf16": False,
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "logging_steps": 1,
        "max_new_tokens": 8,
        "report_to": [],
        "save_strategy": "no",
        "seed": 0,
    }
    values.update(overrides)
    return EOPDConfig(**values)


def _trainer(tiny, tokenizer, tmp_path, **overrides):
    dataset = load_dataset("json", data_files=tiny["dataset"], split="train")
    return EOPDTrainer(
        model=tiny["student"],
        teacher_model=tiny["teacher"],
        args=_config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


# --- transformers / TRL: rollouts (EOPDTrainer itself, so library users get the same quiet) --------------------------


def test_training_with_checkpointing_and_rollouts_raises_neither_deprecation(
    tiny, tokenizer, tmp_path, generation_records
):
    trainer = _trainer(tiny, tokenizer, tmp_path, lmbda=1.0)
    assert trainer.args.activation_checkpointing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not [m for m in generation_records if GENERATION_ARGUMENTS_RECORD in m], generation_records
    # Checkpointing is back on after the rollouts: TRL's toggling still ran.
    assert trainer.model.is_activation_checkpointing


def test_the_generation_config_carries_return_dict_in_generate(tiny, tokenizer, tmp_path):
    assert _trainer(tiny, tokenizer, tmp_path).generation_config.return_dict_in_generate is True


def test_generate_gets_the_config_alone_and_returns_what_the_argument_would(tiny, tokenizer, generation_records):
    from transformers import GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    prompt = tokenizer(["Ada has 3 coins"], return_tensors="pt")
    config = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**prompt, generation_config=config, return_dict_in_generate=True)
    assert [m for m in generation_records if GENERATION_ARGUMENTS_RECORD in m]  # the argument is what is deprecated
    generation_records.clear()
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    folded = _compat.GenerationConfigOnly(model).generate(
        **prompt, generation_config=config, return_dict_in_generate=True
    )
    assert not [m for m in generation_records if GENERATION_ARGUMENTS_RECORD in m], generation_records
    assert torch.equal(folded.sequences, plain.sequences)
    # The caller's config is not changed behind its back; other generation arguments still reach transformers.
    assert config.return_dict_in_generate is not True
    tensor_out = _compat.GenerationConfigOnly(model).generate(**prompt, generation_config=config)
    assert torch.equal(tensor_out, plain.sequences)
    generation_records.clear()
    hf_logging.warning_once.cache_clear()
    _compat.GenerationConfigOnly(model).generate(
        **prompt, generation_config=config, return_dict_in_generate=True, output_scores=True
    )
    assert [m for m in generation_records if "output_scores" in m], generation_records


def test_a_peft_student_is_wrapped_without_the_checkpointing_deprecation(tiny, tokenizer, tmp_path):
    from peft import LoraConfig

    dataset = load_dataset("json", data_files=tiny["dataset"], split="train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = EOPDTrainer(
            model=tiny["student"],
            teacher_model=tiny["teacher"],
            args=_config(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        )
        wrapped = list(caught)
        _ = trainer.model.base_model.model.is_gradient_checkpointing  # the user's own use of the old name, after
    assert type(trainer.model).__name__.startswith("PeftModel")
    assert not [str(w.message) for w in wrapped if "checkpointing" in str(w.message)]
    assert [w for w in caught if "is_gradient_checkpointing" in str(w.message)], "the filter outlived the wrapping"


def test_save_tiny_setup_tells_deepspeed_first(tmp_path, monkeypatch):
    """Saving is often what first imports DeepSpeed; `EOPDConfig`'s import tells it too, which the README's quick start
    shows in a fresh process (tests/test_readme.py)."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    save_tiny_setup(tmp_path, num_examples=2)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # the user's choice is kept
    save_tiny_setup(tmp_path, num_examples=2)
    assert os.environ["DS_ACCELERATOR"] == "xpu"


def test_checkpointing_names_are_quiet_only_while_trl_toggles_them(tiny):
    from accelerate import Accelerator

    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    model.activation_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _compat.unwrap_model_for_generation(model, Accelerator(cpu=True)) as unwrapped:
            assert not unwrapped.is_activation_checkpointing
            toggled_quietly = list(caught)
            _ = unwrapped.is_gradient_checkpointing  # the user's own use of the old name, inside the block
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert not toggled_quietly, [str(w.message) for w in toggled_quietly]
    assert [str(w.message).split(" ")[0] for w in caught] == ["`is_gradient_checkpointing`", "something"]
    assert model.is_activation_checkpointing


def test_an_error_inside_the_rollout_propagates_and_leaves_the_model_as_trl_does(tiny):
    from accelerate import Accelerator
    from trl.models.utils import unwrap_model_for_generation

    states = []
    for unwrap in (unwrap_model_for_generation, _compat.unwrap_model_for_generation):
        model = AutoModelForCausalLM.from_pretrained(tiny["student"])
        model.activation_checkpointing_enable()
        with pytest.raises(RuntimeError, match="sampling failed"), unwrap(model, Accelerator(cpu=True)):
            raise RuntimeError("sampling failed")
        states.append(model.is_activation_checkpointing)
    assert states[1] == states[0]


# --- accelerate: gradient accumulation under DeepSpeed ---------------------------------------------------------------


def test_without_deepspeed_accelerate_still_accumulates_one_step(tiny, tokenizer, tmp_path):
    # Outside DeepSpeed, accelerate would divide the loss by its own count: transformers' 1 must stay.
    trainer = _trainer(tiny, tokenizer, tmp_path, gradient_accumulation_steps=3)
    assert trainer.accelerator.gradient_accumulation_steps == 1


DEEPSPEED_RUN = textwrap.dedent("""
    import logging, sys
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl_eopd import EOPDConfig, EOPDTrainer

    student, teacher, data, out = sys.argv[1:]
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("accelerate.accelerator").addHandler(Keep(logging.WARNING))
    zero2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
    args = EOPDConfig(output_dir=out, bf16=False, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                      max_steps=1, max_new_tokens=4, report_to=[], save_strategy="no", deepspeed=zero2,
                      ddp_backend="gloo", activation_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(student)
    trainer = EOPDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                          train_dataset=load_dataset("json", data_files=data, split="train").select(range(8)))
    print("BUILT WITH:", trainer.accelerator.gradient_accumulation_steps)
    trainer.train()
    print("TRAINED WITH:", trainer.accelerator.gradient_accumulation_steps)
    print("ACCELERATE RECORDS:", [m for m in records if "Gradient accumulation" in m])
""")


@pytest.mark.slow
def test_under_deepspeed_accelerate_gets_the_accumulation_count_before_it_compares(tiny, tmp_path):
    pytest.importorskip("deepspeed")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-c",
        DEEPSPEED_RUN,
        tiny["student"],
        tiny["teacher"],
        tiny["dataset"],
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ACCELERATE RECORDS: []" in proc.stdout, proc.stdout[-2000:]
    # The count accelerate ends with is DeepSpeed's, as before; it only has it from the start.
    assert "BUILT WITH: 2" in proc.stdout and "TRAINED WITH: 2" in proc.stdout, proc.stdout[-2000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- DeepSpeed: the shared-memory op's print and the collectives' names ----------------------------------------------


def test_only_the_shm_build_is_silenced_and_a_failed_build_shows_its_output(capsys, monkeypatch):
    ds_torch = pytest.importorskip("deepspeed.comm.torch")

    def build_and_report():
        print("compiling the op")
        print("DeepSpeed op built successfully")
        return "op"

    monkeypatch.setattr(ds_torch, "build_shm_op", build_and_report)
    with _compat.deepspeed_shm_op_built_quietly():
        print("rank 1: something real")
        assert ds_torch.build_shm_op() == "op"
    assert ds_torch.build_shm_op is build_and_report
    assert capsys.readouterr().out == "rank 1: something real\n"

    def build_and_fail():
        print("compiler said: no avx2")
        raise RuntimeError("build failed")

    monkeypatch.setattr(ds_torch, "build_shm_op", build_and_fail)
    with _compat.deepspeed_shm_op_built_quietly(), pytest.raises(RuntimeError, match="build failed"):
        ds_torch.build_shm_op()
    assert capsys.readouterr().out == "compiler said: no avx2\n"


COLLECTIVES_RUN = textwrap.dedent("""
    import sys, warnings
    import torch
    import deepspeed
    import deepspeed.comm as dist
    from trl_eopd import _compat

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    def calls():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.zeros(3)
            dist.all_gather_into_tensor(out, torch.arange(3.0))
            scattered = torch.zeros(3)
            dist.reduce_scatter_tensor(scattered, torch.arange(3.0))
        assert torch.equal(out, torch.arange(3.0)) and torch.equal(scattered, torch.arange(3.0)), (out, scattered)
        return sorted({str(w.message).split(" ")[0] for w in caught if issubclass(w.category, FutureWarning)})
    print("BEFORE:", calls())
    _compat.deepspeed_collectives_by_current_torch_names()
    print("AFTER:", calls())
""")


@pytest.mark.slow
def test_deepspeed_calls_torch_collectives_by_their_current_names(tmp_path):
    pytest.importorskip("deepspeed")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", COLLECTIVES_RUN], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # Before: torch's warnings (so the check can fail); after: the same results without them.
    assert (
        "BEFORE: ['`torch.distributed.all_gather_into_tensor`', '`torch.distributed.reduce_scatter_tensor`']"
        in proc.stdout
    ), proc.stdout
    assert "AFTER: []" in proc.stdout, proc.stdout


def test_without_a_deepspeed_backend_nothing_is_touched_or_imported():
    had_deepspeed = "deepspeed.comm.comm" in sys.modules
    _compat.deepspeed_collectives_by_current_torch_names()
    assert ("deepspeed.comm.comm" in sys.modules) == had_deepspeed


# --- the command line ------------------------------------------------------------------------------------------------


def test_deepspeed_runs_are_recognised(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not uses_deepspeed(["--config", "tiny-cpu"], {})
    assert uses_deepspeed(["--deepspeed", "ds.json"], {})
    assert uses_deepspeed(["--deepspeed=ds.json"], {})
    assert uses_deepspeed([], {"deepspeed": "ds.json"})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert uses_deepspeed([], {})


def test_set_up_outside_deepspeed_leaves_deepspeed_alone(capsys):
    ds_torch = sys.modules.get("deepspeed.comm.torch")
    before = getattr(ds_torch, "build_shm_op", None)
    with deepspeed_set_up_quietly(active=False):
        print("DeepSpeed op built successfully")
        assert getattr(sys.modules.get("deepspeed.comm.torch"), "build_shm_op", None) is before
    assert capsys.readouterr().out == "DeepSpeed op built successfully\n"


def test_config_no_longer_warns_about_checkpointing_or_pinned_memory(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = EOPDConfig(output_dir=str(tmp_path), bf16=False)
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    # Same setting as before, under transformers' new name.
    assert config.activation_checkpointing is True and config.gradient_checkpointing is True
    old_name_off = EOPDConfig(output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False)
    assert old_name_off.activation_checkpointing is False
    if not torch.accelerator.is_available():
        assert config.dataloader_pin_memory is False
