"""trl-eopd: Entropy-Aware On-Policy Distillation (arXiv 2603.07079) for Hugging Face TRL."""

from .config import EOPDConfig
from .loss import EOPDStats, eopd_loss, eopd_loss_and_stats

__version__ = "0.1.0"


def __getattr__(name):
    # The trainer pulls in transformers' Trainer stack; import it only when asked for, so `eopd_loss` stays light.
    if name == "EOPDTrainer":
        from .trainer import EOPDTrainer

        return EOPDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EOPDConfig", "EOPDStats", "EOPDTrainer", "eopd_loss", "eopd_loss_and_stats", "__version__"]
