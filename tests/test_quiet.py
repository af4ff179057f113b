"""Noise: known-harmless warnings are fixed at their cause or silenced only where they arise; real ones still show."""

import logging
import warnings

import pytest

from trl_eopd.cli.quiet import (
    HARMLESS_LOG_RECORDS,
    HARMLESS_PRINTS,
    HARMLESS_WARNINGS,
    harmless_prints_dropped,
    harmless_warnings_silenced,
)


def _warned(message, category=FutureWarning):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with harmless_warnings_silenced():
            warnings.warn(message, category)
        warnings.warn(message, category)  # the same message outside the block
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("message", [
    "`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use `activation_checkpointing_enable`.",
    "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead.",
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single`.",
])
def test_known_harmless_warnings_are_dropped_only_inside_the_block(message):
    assert _warned(message) == [message]


@pytest.mark.parametrize("message, category", [
    ("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning),  # fixed at its cause
    ("something new is deprecated", FutureWarning),
    ("`gradient_checkpointing_enable` is deprecated", UserWarning),  # another category is another warning
])
def test_other_warnings_pass(message, category):
    assert _warned(message, category) == [message, message]


def test_known_harmless_log_records_are_dropped_and_others_pass(caplog):
    caplog.set_level(logging.WARNING)
    mismatch = ("Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 2. "
                "Using DeepSpeed's value.")
    other = "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 4, DeepSpeed config has 2."
    with harmless_warnings_silenced():
        logging.getLogger("accelerate.accelerator").warning(mismatch)
        logging.getLogger("accelerate.accelerator").warning(other)
        logging.getLogger("accelerate.other").warning(mismatch)
    logging.getLogger("accelerate.accelerator").warning(mismatch)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("accelerate.accelerator", other), ("accelerate.other", mismatch), ("accelerate.accelerator", mismatch)]
    assert not logging.getLogger("accelerate.accelerator").filters


def test_every_entry_says_why_it_is_harmless():
    for entry in HARMLESS_WARNINGS + HARMLESS_LOG_RECORDS:
        assert len(entry[2]) > 40
    for entry in HARMLESS_PRINTS:
        assert len(entry[1]) > 40


def test_known_harmless_prints_are_dropped_and_other_lines_kept(capsys):
    with harmless_prints_dropped():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("rank 1: something real")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully, and more")
        print("no newline at the end", end="")
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert capsys.readouterr().out == (
        "rank 1: something real\n"
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully, and more\n"
        "no newline at the end"
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n"
    )


def test_config_no_longer_warns_about_checkpointing_or_pinned_memory(tmp_path):
    import torch

    from trl_eopd import EOPDConfig

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
