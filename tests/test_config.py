"""EOPDConfig: EOPD's defaults, and a clear ValueError for every invalid value."""

import logging
import math

import pytest

from trl_eopd import EOPDConfig


def make(**kwargs):
    return EOPDConfig(output_dir="unused", bf16=False, report_to=[], **kwargs)


def test_defaults_are_the_papers():
    config = make()
    assert config.entropy_threshold == 0.8
    assert config.forward_kl_coef == 1.0
    assert config.gate == "augment"
    assert config.forward_kl_top_k == 16
    assert make(forward_kl_top_k=None).forward_kl_top_k is None  # the full vocabulary stays one value away
    assert config.reverse_kl_estimator == "analytic"
    assert (config.lmbda, config.beta, config.temperature) == (1.0, 1.0, 1.0)
    assert config.memory_efficient_loss is True


def test_infinite_threshold_is_plain_opd_and_parses_from_text():
    assert make(entropy_threshold=float("inf")).entropy_threshold == math.inf
    assert make(entropy_threshold="inf").entropy_threshold == math.inf


def test_sampled_estimator_is_accepted_when_fully_on_policy():
    config = make(reverse_kl_estimator="sampled", forward_kl_top_k=16)
    assert config.reverse_kl_estimator == "sampled" and config.forward_kl_top_k == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(entropy_threshold=float("nan")), r"`entropy_threshold` must be a number >= 0"),
        (dict(entropy_threshold=-1.0), r"`entropy_threshold` must be a number >= 0"),
        (dict(forward_kl_coef=-0.5), r"`forward_kl_coef` must be a finite number >= 0"),
        (dict(forward_kl_coef=float("inf")), r"`forward_kl_coef` must be a finite number >= 0"),
        (dict(gate="both"), r"`gate` must be one of \('augment', 'switch'\); got 'both'"),
        (dict(forward_kl_top_k=0), r"`forward_kl_top_k` must be None \(full vocabulary\) or an integer >= 1; got 0"),
        (dict(forward_kl_top_k=2.5), r"`forward_kl_top_k` must be None"),
        (dict(reverse_kl_estimator="mc"), r"`reverse_kl_estimator` must be one of \('analytic', 'sampled'\)"),
        (dict(reverse_kl_estimator="sampled", beta=0.5), r"requires `beta=1.0` \(got 0.5\)"),
        (dict(reverse_kl_estimator="sampled", lmbda=0.5), r"requires `lmbda=1.0` \(got 0.5\)"),
        (dict(reverse_kl_estimator="sampled", seq_kd=True), r"requires `seq_kd=False` \(got True\)"),
        (dict(temperature=0.0), r"`temperature` must be a finite number > 0"),
        (dict(loss_chunk_size=0), r"`loss_chunk_size` must be an integer >= 1; got 0"),
        (dict(monitor_entropy_threshold=float("inf")), r"`monitor_entropy_threshold` must be a finite number >= 0"),
        (dict(monitor_entropy_threshold=-0.1), r"`monitor_entropy_threshold` must be a finite number >= 0"),
    ],
)
def test_invalid_values_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_every_eopd_field_has_help_text():
    from dataclasses import fields

    from trl.experimental.gkd import GKDConfig

    gkd_fields = {f.name for f in fields(GKDConfig)}
    eopd_fields = [f for f in fields(EOPDConfig) if f.name not in gkd_fields]
    assert {f.name for f in eopd_fields} >= {
        "entropy_threshold",
        "forward_kl_coef",
        "gate",
        "forward_kl_top_k",
        "reverse_kl_estimator",
    }
    for f in eopd_fields:
        assert len(f.metadata.get("help", "")) > 20, f.name
        assert f"{f.name} (" in EOPDConfig.__doc__, f"{f.name} is missing from the class docstring"


# ---------------------------------------------------------------------------------------------------------------------
# bf16: an unset value follows the hardware, an explicit one is the user's


@pytest.fixture
def bf16_support(monkeypatch):
    """Set whether transformers' own bf16 check passes (it reads these two names from its `training_args`)."""
    from transformers import training_args

    def set_support(supported: bool):
        monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: supported)
        monkeypatch.setattr(training_args, "is_torch_xla_available", lambda: False)

    return set_support


def test_unset_bf16_falls_back_to_float32_with_one_warning_per_process_where_unsupported(bf16_support, caplog):
    from trl_eopd import config as config_module

    bf16_support(False)
    config_module._say_float32_fallback.cache_clear()  # earlier tests of this process may have said it already
    with caplog.at_level(logging.DEBUG, logger="trl_eopd"):
        config = EOPDConfig(output_dir="unused", report_to=[])
        again = EOPDConfig(output_dir="unused", report_to=[])
    assert config.bf16 is False and again.bf16 is False
    lines = [record for record in caplog.records if record.name.startswith("trl_eopd")]
    # A warning, so that Python prints it without any logging set up (the README's quick start shows it in a fresh
    # process: tests/test_readme.py); the second config says nothing new.
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "no bf16 support" in lines[0].getMessage() and "float32" in lines[0].getMessage()


def test_explicit_bf16_fails_where_unsupported_naming_the_ways_out(bf16_support):
    bf16_support(False)
    with pytest.raises(ValueError, match=r"`bf16=True` needs .*`bf16: false` .*`use_cpu: true`"):
        EOPDConfig(output_dir="unused", report_to=[], bf16=True)


def test_unset_bf16_is_kept_where_supported(bf16_support, caplog):
    bf16_support(True)
    with caplog.at_level(logging.DEBUG, logger="trl_eopd"):
        assert EOPDConfig(output_dir="unused", report_to=[]).bf16 is True
    assert not [record for record in caplog.records if record.name.startswith("trl_eopd")]
    bf16_support(False)
    # `use_cpu=True` is how transformers supports bf16 on a CPU; fp16 excludes bf16 as in TRL.
    assert EOPDConfig(output_dir="unused", report_to=[], use_cpu=True).bf16 is True
    assert EOPDConfig(output_dir="unused", report_to=[], bf16=False).bf16 is False


def test_bf16_from_the_command_line_is_explicit(bf16_support):
    from trl_eopd.cli.train import parse_args

    bf16_support(False)
    _, training_args, _ = parse_args(["--config", "tiny-cpu"])  # the recipe says `bf16: false`
    assert training_args.bf16 is False
    from trl_eopd.cli.errors import UsageError

    with pytest.raises(UsageError, match="`bf16=True` needs"):
        parse_args(["--config", "tiny-cpu", "--bf16", "true"])


# A teacher served by vLLM (trl_eopd/teacher_server.py): what it cannot train exactly is refused at construction.
SERVED = dict(teacher_model_server_url="http://127.0.0.1:8000", reverse_kl_estimator="sampled")


def test_a_served_teacher_config_with_the_papers_recipe_is_accepted():
    config = make(**SERVED)
    assert config.teacher_model_server_url == "http://127.0.0.1:8000"
    assert config.teacher_top_logprobs >= config.forward_kl_top_k
    assert config.teacher_model_server_timeout > 0 and config.teacher_model_server_retries >= 0
    assert make(**SERVED, forward_kl_top_k=8, teacher_top_logprobs=8).teacher_top_logprobs == 8
    assert make(**SERVED, teacher_model_server_retries=0).teacher_model_server_retries == 0  # one attempt, no retry


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reverse_kl_estimator="analytic"), r"`reverse_kl_estimator='analytic'` needs the teacher's full"),
        (dict(reverse_kl_estimator="analytic", beta=0.5), r"`beta=0.5` \(a generalized JSD\) needs the teacher"),
        (dict(forward_kl_top_k=None), r"`forward_kl_top_k=None` \(the full-vocabulary forward KL\) needs"),
        (dict(teacher_top_logprobs=8), r"`teacher_top_logprobs=8` is below `forward_kl_top_k=16`"),
        (dict(temperature=2.0), r"`temperature=2.0` cannot be applied to a served teacher"),
        (dict(memory_efficient_loss=False), r"`memory_efficient_loss=False` is not available with"),
        (dict(teacher_model_server_url="localhost:8000"), r"`teacher_model_server_url` must be an http\(s\) base URL"),
        (dict(teacher_top_logprobs=0), r"`teacher_top_logprobs` must be an integer >= 1"),
        (dict(teacher_model_server_timeout=0), r"`teacher_model_server_timeout` must be a finite number of seconds"),
        (dict(teacher_model_server_retries=-1), r"`teacher_model_server_retries` must be an integer >= 0"),
        (
            dict(teacher_entropy_estimate="mean"),
            r"`teacher_entropy_estimate` must be one of decay, midpoint, lower, upper, top_k; got 'mean'",
        ),
    ],
)
def test_a_served_teacher_refuses_what_it_cannot_compute(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**{**SERVED, **kwargs})


def test_the_served_gates_entropy_estimate_is_the_losss_default_and_selectable_by_name():
    from trl_eopd.loss.served import DEFAULT_ENTROPY_ESTIMATE, ENTROPY_ESTIMATES

    assert make(**SERVED).teacher_entropy_estimate == DEFAULT_ENTROPY_ESTIMATE == "decay"
    for name in ENTROPY_ESTIMATES:
        assert make(**SERVED, teacher_entropy_estimate=name).teacher_entropy_estimate == name


def test_without_a_served_teacher_its_restrictions_do_not_apply():
    config = make(reverse_kl_estimator="analytic", forward_kl_top_k=None, temperature=2.0, teacher_top_logprobs=4)
    assert config.teacher_model_server_url is None


@pytest.mark.parametrize(
    "name, value",
    [
        ("per_device_train_batch_size", 0),
        ("per_device_eval_batch_size", -1),
        ("gradient_accumulation_steps", 0),
        ("max_new_tokens", 0),
        ("max_length", 0),
    ],
)
def test_sizes_below_one_are_named(name, value):
    with pytest.raises(ValueError, match=rf"^`{name}` must be (None or )?an integer >= 1.*got {value}\.$"):
        make(**{name: value})
    assert getattr(make(**{name: 1}), name) == 1
