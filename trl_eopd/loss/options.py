"""The options of the EOPD loss: one frozen definition, with the paper's defaults and their validation.

`EOPDConfig` takes its defaults from here and hands the trainer an [`EOPDLossOptions`]; both loss functions
([`eopd_loss_and_stats`] on full logits and the chunked loss on hidden states) take one too. So each option, its
default and its allowed values are written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real

IGNORE_INDEX = -100
GATES = ("augment", "switch")
REVERSE_KL_ESTIMATORS = ("analytic", "sampled")


@dataclass(frozen=True)
class EOPDLossOptions:
    r"""
    Options of the EOPD loss, with the defaults of the paper (arXiv 2603.07079).

    Parameters:
        entropy_threshold (`float`, *optional*, defaults to `0.8`):
            Teacher entropy, in nats, above which a token also receives the forward KL. The gate is strict
            (`H > entropy_threshold`). `float("inf")` switches it off, which is plain on-policy distillation (OPD);
            with the `"analytic"` estimator that is `GKDTrainer`'s loss with the same `beta` only at
            `temperature=1.0` (GKD applies its temperature to sampling, not to the loss).
        forward_kl_coef (`float`, *optional*, defaults to `1.0`):
            Weight (>= 0) of the forward KL on high-entropy tokens.
        gate (`str`, *optional*, defaults to `"augment"`):
            `"augment"` adds the forward KL to the base term on high-entropy tokens (the paper); `"switch"` replaces
            the base term with it there.
        beta (`float`, *optional*, defaults to `1.0`):
            Interpolation of GKD's generalized Jensen-Shannon divergence used as the `"analytic"` base term: 1.0 is
            the reverse KL(student || teacher), 0.0 the forward KL.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature applied to both models' logits before every divergence and the entropy.
        forward_kl_top_k (`int` or `None`, *optional*, defaults to `16`):
            The forward KL uses the teacher's top-k tokens, renormalised over them, as in the paper's code (k=16).
            `None` uses the full vocabulary.
        reverse_kl_estimator (`str`, *optional*, defaults to `"analytic"`):
            `"analytic"`: the generalized JSD with `beta` over the full vocabulary. `"sampled"`: the paper's
            single-sample policy-gradient estimate on the sampled token; it requires `beta=1.0`.
        monitor_entropy_threshold (`float`, *optional*, defaults to `0.8`):
            Entropy, in nats, above which a token counts as high-entropy in the gate-independent `*_monitor`
            statistics. It changes no loss value.
    """

    entropy_threshold: float = 0.8
    forward_kl_coef: float = 1.0
    gate: str = "augment"
    beta: float = 1.0
    temperature: float = 1.0
    forward_kl_top_k: int | None = 16
    reverse_kl_estimator: str = "analytic"
    monitor_entropy_threshold: float = 0.8

    def __post_init__(self):
        _check_number(
            "entropy_threshold",
            self.entropy_threshold,
            minimum=0.0,
            allow_inf=True,
            meaning="in nats, or float('inf') to switch the gate off (plain OPD)",
        )
        _check_number("forward_kl_coef", self.forward_kl_coef, minimum=0.0)
        if self.gate not in GATES:
            raise ValueError(f"`gate` must be one of {GATES}; got {self.gate!r}.")
        if not _is_real(self.beta) or math.isnan(self.beta) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"`beta` must be in [0.0, 1.0] (1.0 is reverse KL, 0.0 forward KL); got {self.beta!r}.")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"`temperature` must be a finite number > 0; got {self.temperature!r}.")
        top_k = self.forward_kl_top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
            raise ValueError(f"`forward_kl_top_k` must be None (full vocabulary) or an integer >= 1; got {top_k!r}.")
        if self.reverse_kl_estimator not in REVERSE_KL_ESTIMATORS:
            raise ValueError(
                f"`reverse_kl_estimator` must be one of {REVERSE_KL_ESTIMATORS}; got {self.reverse_kl_estimator!r}."
            )
        _check_number(
            "monitor_entropy_threshold",
            self.monitor_entropy_threshold,
            minimum=0.0,
            meaning="in nats (the paper's analyses use 0.8)",
        )
        if self.reverse_kl_estimator == "sampled" and self.beta != 1.0:
            raise ValueError(sampled_estimator_error([f"`beta=1.0` (got {self.beta!r})"]))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def resolve(cls, options: EOPDLossOptions | None, overrides: dict) -> EOPDLossOptions:
        """`options` (default: the paper's) with `overrides` replaced; an unknown name is a `TypeError` naming it."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown EOPD loss option(s) {unknown}; the options are {list(cls.names())}.")
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise TypeError(f"`options` must be an {cls.__name__}; got {type(options).__name__}.")
        return options.replace(**overrides) if overrides else options

    def replace(self, **changes) -> EOPDLossOptions:
        from dataclasses import replace

        return replace(self, **changes)


def sampled_estimator_error(problems: list[str]) -> str:
    # The sampled estimator is a policy gradient: it is only unbiased on tokens the student itself sampled.
    return (
        "`reverse_kl_estimator='sampled'` is a policy-gradient estimate that is only valid on the student's own "
        "samples, so it requires " + ", ".join(problems) + ". Use `reverse_kl_estimator='analytic'` otherwise."
    )


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_number(name: str, value, *, minimum: float, allow_inf: bool = False, meaning: str = "") -> None:
    ok = _is_real(value) and not math.isnan(value) and value >= minimum and (allow_inf or math.isfinite(value))
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        suffix = f" {meaning}" if meaning else ""
        raise ValueError(f"`{name}` must be {kind} >= {minimum:g}{suffix}; got {value!r}.")
