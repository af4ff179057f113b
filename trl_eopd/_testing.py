"""Files the test suite reads back after a `trl-eopd train` subprocess; not part of the user interface.

Set `TRL_EOPD_TEST_ARTIFACTS=1` in a run's environment to get, in `output_dir`, `log_history_rank{N}.json` from every
process (the logged metrics of a distributed run) and `probe_logits.pt` (the trained student's logits on a fixed
input, from rank 0, to compare with a reload).
"""

from __future__ import annotations

import json
import os

ENV_VAR = "TRL_EOPD_TEST_ARTIFACTS"


def requested() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def save_artifacts(trainer, output_dir: str) -> None:
    import torch

    state = trainer.accelerator.state
    with open(os.path.join(output_dir, f"log_history_rank{state.process_index}.json"), "w") as f:
        json.dump(trainer.state.log_history, f)

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    vocab = trainer.model.config.get_text_config().vocab_size
    probe = (torch.arange(16, dtype=torch.long).unsqueeze(0) * 7 + 3) % vocab
    model.eval()
    # Every rank runs the forward: under ZeRO-3 it gathers each layer's shards collectively.
    with torch.no_grad():
        logits = model(input_ids=probe.to(trainer.accelerator.device)).logits.float().cpu()
    if trainer.accelerator.is_main_process:
        torch.save({"input_ids": probe, "logits": logits}, os.path.join(output_dir, "probe_logits.pt"))
    trainer.accelerator.wait_for_everyone()
