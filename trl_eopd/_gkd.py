"""TRL's GKD classes that EOPD builds on, imported in one place without TRL's experimental-API notice.

TRL 1.16 keeps GKD under `trl.experimental`, which warns (`TRLExperimentalWarning`) on first import that its APIs may
change. pyproject.toml pins the TRL minor this package is tested with, and tests/test_compat.py checks what we rely
on, so the notice is noise for EOPD's users. It is suppressed by its class, here only.
"""

from trl.import_utils import suppress_experimental_warning

with suppress_experimental_warning():
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

__all__ = ["DataCollatorForChatML", "GKDConfig", "GKDTrainer"]
