"""Train the demo's teacher from scratch on diverse valid solutions, and find the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .models import TEACHER_SIZE, build_model, supervised_train
from .task import build_tokenizer, training_rows_fn

ASSETS_TEACHER = Path(__file__).parent / "assets" / "teacher"
TEACHER_STEPS = 2500
TEACHER_BATCH_SIZE = 64
TEACHER_LR = 3e-3


def train_teacher(
    output_dir: str | Path,
    *,
    steps: int = TEACHER_STEPS,
    batch_size: int = TEACHER_BATCH_SIZE,
    learning_rate: float = TEACHER_LR,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the teacher on a fresh uniformly-sampled valid solution of a fresh problem per row and save it.

    Because every row's solution is drawn uniformly among all valid subsets in a random order, the teacher learns the
    whole distribution over solutions, so its next-token distribution is genuinely spread at branch points. It is
    saved in bfloat16 (to keep the shipped checkpoint small) with its tokenizer, loadable with `from_pretrained`.
    """
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, TEACHER_SIZE, seed=seed)
    losses = supervised_train(
        model,
        tokenizer,
        training_rows_fn(set()),
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        progress="teacher SFT" if progress else None,
    )
    model.to(torch.bfloat16).save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / "training_loss.txt").write_text("\n".join(f"{loss:.4f}" for loss in losses[::10]) + "\n")
    return output_dir


def load_model(path: str | Path):
    """Load a demo model in float32, whatever dtype it was saved in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model
