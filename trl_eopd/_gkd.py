"""TRL's GKD classes that EOPD builds on, imported in one place without TRL's experimental-API notice.

TRL 1.16 keeps GKD under `trl.experimental`, which warns (`TRLExperimentalWarning`) on first import that its APIs may
change. pyproject.toml pins the TRL minor this package is tested with, and tests/test_compat.py checks what we rely
on, so the notice is noise for EOPD's users. It is suppressed by its class, here only. TRL's warning about the
installed vLLM's version is kept quiet from here on (`_compat.trl_vllm_version_check_quiet`).
"""

from trl.import_utils import suppress_experimental_warning

from . import _compat

_compat.trl_vllm_version_check_quiet()

with suppress_experimental_warning():
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

__all__ = ["DataCollatorForChatML", "GKDConfig", "GKDTrainer"]
