"""Files the multi-process and CLI tests read back after a training subprocess, written by a test-side callback.

`SaveArtifacts` writes, in `output_dir`, `log_history_rank{N}.json` from every process (the logged metrics of a
distributed run; rewritten after each evaluation so it includes them) and `probe_logits.pt` (the trained student's
logits on a fixed input, from rank 0, to compare with a reload). `tests/run_with_artifacts.py` runs a training script
with it.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback


class SaveArtifacts(TrainerCallback):
    def _write_history(self, args, state) -> None:
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(args.output_dir, f"log_history_rank{rank}.json"), "w") as f:
            json.dump(state.log_history, f)

    def on_evaluate(self, args, state, control, **kwargs):
        self._write_history(args, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write_history(args, state)
        vocab = model.config.get_text_config().vocab_size
        probe = (torch.arange(16, dtype=torch.long).unsqueeze(0) * 7 + 3) % vocab
        was_training = model.training
        model.eval()
        # Every rank runs the forward: under ZeRO-3 it gathers each layer's shards collectively.
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(input_ids=probe.to(device)).logits.float().cpu()
        model.train(was_training)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save({"input_ids": probe, "logits": logits}, os.path.join(args.output_dir, "probe_logits.pt"))
