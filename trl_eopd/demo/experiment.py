"""The demo experiment: distil one student twice, with OPD and with EOPD, through `EOPDTrainer`, and compare.

For every seed: a student is warm-started by a short supervised run on diverse solutions (the paper distils
pretrained base models, not random ones), saved, and reloaded twice; each copy is distilled from the same teacher
with the same seed, data and step budget, once with the gate off (`entropy_threshold=inf`, plain OPD) and once with
EOPD. The teacher, the warm-started student and both distilled students are then evaluated on the same held-out
problems with the same sampling seed.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .evaluate import evaluate
from .models import STUDENT_SIZE, build_model, supervised_train
from .plots import curves_from_log_history, plot_pass_at_k, plot_training_curves
from .task import IM_END, eval_problems, training_rows_fn
from .teacher import ASSETS_TEACHER, load_model, train_teacher

METHODS = ("opd", "eopd")
MODELS = ("teacher", "student_init", "opd", "eopd")
KS = list(range(1, 9))
# Per seed: teacher evaluation, student warm-up and evaluation, OPD run, EOPD run.
STAGES_PER_SEED = 2 + len(METHODS)
TABLE_METRICS = [
    ("pass@1", "pass@1"), ("pass@2", "pass@2"), ("pass@4", "pass@4"), ("pass@8", "pass@8"),
    ("distinct_correct", "distinct"), ("solution_coverage", "coverage"), ("token_entropy", "H tok"),
    ("high_entropy_ratio_own", "hiH own"), ("high_entropy_ratio_teacher", "hiH tchr"),
    ("forward_kl_high_entropy", "fKL hiH"),
]


@dataclass
class DemoSettings:
    """Every knob of one demo run; saved verbatim in the JSON."""

    steps: int = 200
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"
    quick: bool = False
    batch_size: int = 32
    learning_rate: float = 1e-3
    entropy_threshold: float = 0.8
    reverse_kl_estimator: str = "analytic"
    max_new_tokens: int = 26
    num_eval_problems: int = 128
    num_eval_samples: int = 16
    student_warmup_steps: int = 600
    student_warmup_lr: float = 3e-3
    teacher_path: str | None = None

    @classmethod
    def quick_settings(cls, **overrides) -> DemoSettings:
        """Small enough for CI (about 20 seconds), still every stage: warm-up, both trainings, evaluation, plots."""
        values = dict(steps=6, seeds=[0, 1], quick=True, num_eval_problems=24, num_eval_samples=8,
                      student_warmup_steps=30, batch_size=16)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _distill(student_path: Path, teacher, tokenizer, settings: DemoSettings, method: str, seed: int,
             output_dir: Path, on_step=None):
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from .. import EOPDConfig, EOPDTrainer
    from .._quiet import harmless_warnings_silenced

    student = load_model(student_path)
    rows = training_rows_fn(set())(0, random.Random(50_000 + seed), settings.steps * settings.batch_size)
    threshold = math.inf if method == "opd" else settings.entropy_threshold
    args = EOPDConfig(
        output_dir=str(output_dir),
        entropy_threshold=threshold,
        # Both runs report their high-entropy shares at the evaluation's threshold, whether or not the gate is on.
        monitor_entropy_threshold=settings.entropy_threshold,
        reverse_kl_estimator=settings.reverse_kl_estimator,
        per_device_train_batch_size=settings.batch_size,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_new_tokens=settings.max_new_tokens,
        max_length=64,
        logging_steps=max(settings.steps // 30, 1),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=False,
        use_cpu=settings.device == "cpu",
        dataloader_num_workers=0,
        # The demo's own stage bar reports progress; the Trainer's bar and its per-step log dicts would bury it.
        # Every logged value still lands in `log_history` and so in results.json and the plots.
        disable_tqdm=True,
    )
    trainer = EOPDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    if on_step is not None:
        class _ReportStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                on_step(state.global_step, state.max_steps)

        trainer.add_callback(_ReportStep())
    with harmless_warnings_silenced():
        trainer.train()
    model = trainer.model
    model.eval()
    return model, trainer.state.log_history


def _summarise(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": values}


def format_table(summary: dict) -> str:
    header = f"{'model':<13}" + "".join(f"{name:>15}" for _, name in TABLE_METRICS)
    lines = [header]
    for model, metrics in summary.items():
        cells = []
        for key, _ in TABLE_METRICS:
            stat = metrics.get(key)
            cells.append(f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat else "-")
        lines.append(f"{model:<13}" + "".join(f"{cell:>15}" for cell in cells))
    return "\n".join(lines)


def run_demo(settings: DemoSettings, output_dir: str | Path, log=print) -> dict:
    """Run the whole comparison, write `results.json` and the PNGs into `output_dir`, and return the results."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    start = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device)

    teacher_path = Path(settings.teacher_path) if settings.teacher_path else ASSETS_TEACHER
    if not (teacher_path / "config.json").exists():
        # Only reached if the shipped checkpoint was removed; the quick run keeps the pipeline but not the quality.
        log(f"No teacher at {teacher_path}; training one from scratch (scripts/make_demo_teacher.py does the same).")
        teacher_path = train_teacher(output_dir / "teacher", steps=60 if settings.quick else 2500)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_path))
    teacher = load_model(teacher_path).to(device)
    problems = eval_problems(settings.num_eval_problems)
    eval_kwargs = dict(num_samples=settings.num_eval_samples, max_new_tokens=settings.max_new_tokens,
                       entropy_threshold=settings.entropy_threshold, ks=KS)

    per_seed = {model: [] for model in MODELS}
    training_curves = {method: [] for method in METHODS}
    stages = tqdm(total=len(settings.seeds) * STAGES_PER_SEED, desc="demo", unit="stage")
    for seed in settings.seeds:
        eval_seed = 1_000 + seed
        stages.set_postfix_str(f"seed {seed}: teacher eval")
        per_seed["teacher"].append(evaluate(teacher, teacher, tokenizer, problems, seed=eval_seed, **eval_kwargs))
        stages.update()

        stages.set_postfix_str(f"seed {seed}: student warm-up")
        student = build_model(tokenizer, STUDENT_SIZE, seed=seed)
        supervised_train(student, tokenizer, training_rows_fn(set()), steps=settings.student_warmup_steps,
                         batch_size=64, learning_rate=settings.student_warmup_lr, seed=seed,
                         warmup_steps=min(50, settings.student_warmup_steps // 5), progress="student warm-up")
        init_path = output_dir / "student_init" / f"seed{seed}"
        student.save_pretrained(str(init_path))
        tokenizer.save_pretrained(str(init_path))
        per_seed["student_init"].append(
            evaluate(student.to(device), teacher, tokenizer, problems, seed=eval_seed, **eval_kwargs))
        stages.update()

        for method in METHODS:
            label = f"seed {seed}: {method.upper()} distillation"
            stages.set_postfix_str(label)
            model, log_history = _distill(
                init_path, teacher, tokenizer, settings, method, seed, output_dir / "runs" / f"{method}-seed{seed}",
                on_step=lambda step, total, label=label: stages.set_postfix_str(f"{label}, step {step}/{total}"))
            training_curves[method].append(curves_from_log_history(log_history))
            per_seed[method].append(
                {**evaluate(model.to(device), teacher, tokenizer, problems, seed=eval_seed, **eval_kwargs),
                 "log_history": log_history})
            stages.update()
    stages.set_postfix_str("done")
    stages.close()

    summary = {}
    for model, results in per_seed.items():
        keys = [k for k in results[0] if k != "log_history"]
        summary[model] = {key: _summarise([r[key] for r in results]) for key in keys}

    plot_training_curves(training_curves, output_dir / "training_curves.png")
    plot_pass_at_k(summary, KS, output_dir / "pass_at_k.png")
    results = {
        "settings": asdict(settings) | {"entropy_threshold_opd": "inf"},
        "task": {"eval_problems": len(problems), "samples_per_problem": settings.num_eval_samples,
                 "eos": IM_END, "teacher_path": str(teacher_path)},
        "summary": summary,
        "per_seed": per_seed,
        "wall_time_s": time.time() - start,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results
