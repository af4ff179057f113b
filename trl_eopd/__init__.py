"""trl-eopd: Entropy-Aware On-Policy Distillation (arXiv 2603.07079) for Hugging Face TRL."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Every public name is imported on first use: `EOPDConfig` pulls in TRL and transformers and `eopd_loss` pulls in torch
# (seconds together), and `trl-eopd --help` or a mistyped subcommand should answer before any of that is loaded.
_LAZY = {
    "EOPDConfig": ".config",
    "EOPDTrainer": ".trainer",
    "EOPDLossOptions": ".loss",
    "EOPDStats": ".loss",
    "chunked_eopd_loss_and_stats": ".loss",
    "eopd_loss": ".loss",
    "eopd_loss_and_stats": ".loss",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "EOPDConfig",
    "EOPDLossOptions",
    "EOPDStats",
    "EOPDTrainer",
    "chunked_eopd_loss_and_stats",
    "eopd_loss",
    "eopd_loss_and_stats",
    "__version__",
]
