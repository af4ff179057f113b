"""One definition of the loss options: the config, both loss functions and the trainer share its defaults."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from trl_eopd import EOPDConfig, EOPDLossOptions, chunked_eopd_loss_and_stats, eopd_loss, eopd_loss_and_stats
from trl_eopd.loss import served_teacher_eopd_loss_and_stats


def _config(**kwargs):
    return EOPDConfig(output_dir="unused", bf16=False, report_to=[], **kwargs)


def test_every_loss_option_default_is_the_configs():
    config = _config()
    paper = EOPDLossOptions()
    for field in dataclasses.fields(EOPDLossOptions):
        assert getattr(config, field.name) == getattr(paper, field.name), field.name
    assert config.loss_options == paper
    # The paper's values, written out once more here on purpose: a changed default must be a deliberate edit.
    assert (paper.entropy_threshold, paper.forward_kl_coef, paper.gate, paper.forward_kl_top_k) == (
        0.8,
        1.0,
        "augment",
        16,
    )
    assert (paper.beta, paper.temperature, paper.reverse_kl_estimator) == (1.0, 1.0, "analytic")


@pytest.mark.parametrize(
    "function", [eopd_loss, eopd_loss_and_stats, chunked_eopd_loss_and_stats, served_teacher_eopd_loss_and_stats]
)
def test_loss_functions_take_the_options_object_not_a_copy_of_its_fields(function):
    parameters = inspect.signature(function).parameters
    assert "options" in parameters
    assert not set(EOPDLossOptions.names()) & set(parameters), "an option is spelled out in the signature again"


def test_standalone_loss_defaults_compute_the_trainers_loss():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 40, generator=generator), 3 * torch.randn(2, 6, 40, generator=generator)
    labels = torch.randint(0, 40, (2, 6), generator=generator)
    trainer_options = _config().loss_options
    default = eopd_loss(student, teacher, labels)
    torch.testing.assert_close(default, eopd_loss(student, teacher, labels, trainer_options), rtol=0, atol=0)
    # The defaults are not inert: the full-vocabulary forward KL gives another value on the same logits.
    assert not torch.allclose(default, eopd_loss(student, teacher, labels, forward_kl_top_k=None))

    hidden_s, hidden_t = torch.randn(12, 8, generator=generator), torch.randn(12, 16, generator=generator)
    weight_s, weight_t = torch.randn(40, 8, generator=generator), 3 * torch.randn(40, 16, generator=generator)
    targets = torch.randint(0, 40, (12,), generator=generator)
    chunked_default, _ = chunked_eopd_loss_and_stats(hidden_s, weight_s, hidden_t, weight_t, targets)
    chunked_trainer, _ = chunked_eopd_loss_and_stats(
        hidden_s, weight_s, hidden_t, weight_t, targets, options=trainer_options
    )
    torch.testing.assert_close(chunked_default, chunked_trainer, rtol=0, atol=0)


def test_overrides_replace_fields_and_unknown_names_are_named():
    options = EOPDLossOptions(gate="switch")
    assert EOPDLossOptions.resolve(options, {"entropy_threshold": 1.5}) == EOPDLossOptions(
        gate="switch", entropy_threshold=1.5
    )
    with pytest.raises(TypeError, match="entropy_treshold"):
        eopd_loss(
            torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), entropy_treshold=1.0
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("entropy_threshold", -1.0),
        ("entropy_threshold", math.nan),
        ("forward_kl_coef", math.inf),
        ("gate", "mix"),
        ("beta", 1.5),
        ("temperature", 0.0),
        ("forward_kl_top_k", 0),
        ("forward_kl_top_k", True),
        ("reverse_kl_estimator", "mc"),
        ("monitor_entropy_threshold", math.inf),
    ],
)
def test_bad_values_are_rejected_by_the_options_and_the_config_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        EOPDLossOptions(**{field: value})
    with pytest.raises(ValueError, match=field):  # GKDConfig checks `beta` first, in its own words
        _config(**{field: value})


def test_the_sampled_estimator_needs_on_policy_data_in_the_config_only():
    EOPDLossOptions(reverse_kl_estimator="sampled")  # the pure loss does not know where the tokens came from
    with pytest.raises(ValueError, match="`lmbda=1.0`"):
        _config(reverse_kl_estimator="sampled", lmbda=0.5)
    with pytest.raises(ValueError, match="`beta=1.0`"):
        EOPDLossOptions(reverse_kl_estimator="sampled", beta=0.5)
