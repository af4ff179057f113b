import os
import sys

import pytest

# Tests import the float64 reference as a plain module, and never reach a hub.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The models and data behind the CLI's `tiny://` names, built once in a private folder.

    `TRL_EOPD_TINY_DIR` stays pointed at it for the session, so in-process CLI calls and the subprocesses the tests
    launch (which inherit the environment) reuse the same files instead of the user's cache.
    """
    from trl_eopd.cli.tiny_cache import ensure_tiny_setup

    root = tmp_path_factory.mktemp("tiny-cli") / "assets"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRL_EOPD_TINY_DIR", str(root))
        yield root, ensure_tiny_setup()
