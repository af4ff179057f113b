"""The demo experiment: distil one student twice, with OPD and with EOPD, through `EOPDTrainer`, and compare.

For every seed: a student is warm-started by a short supervised run on diverse solutions (the paper distils
pretrained base models, not random ones), saved, and reloaded twice; each copy is distilled from the same teacher
with the same seed, data and step budget, once with the gate off (`entropy_threshold=inf`, plain OPD) and once with
EOPD. The teacher, the warm-started student and both distilled students are then evaluated on the same held-out
problems with the same sampling seed, with the paper's protocol (temperature 1.0, top-p 0.8, unbiased pass@k) and,
as a second protocol, with no nucleus cut (top-p 1.0, the distribution the students are trained on). Because OPD and
EOPD share their initialisation per seed, the comparison is the paired difference EOPD - OPD with a t interval over
seeds.
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
from .plots import (
    curves_from_log_history,
    plot_mechanism,
    plot_paired_differences,
    plot_pass_at_k,
    plot_training_curves,
)
from .stats import paired_differences
from .task import IM_END, eval_problems, training_rows_fn
from .teacher import ASSETS_TEACHER, load_model, train_teacher

METHODS = ("opd", "eopd")
MODELS = ("teacher", "student_init", "opd", "eopd")
KS = list(range(1, 9))
# Per seed: teacher evaluation, student warm-up and evaluation, OPD run, EOPD run.
STAGES_PER_SEED = 2 + len(METHODS)
TABLE_METRICS = [
    ("pass@1", "pass@1"),
    ("pass@2", "pass@2"),
    ("pass@4", "pass@4"),
    ("pass@8", "pass@8"),
    ("distinct_correct", "distinct"),
    ("solution_coverage", "coverage"),
    ("token_entropy", "H tok"),
    ("high_entropy_ratio_own", "hiH own"),
    ("high_entropy_ratio_teacher", "hiH tchr"),
    ("forward_kl_high_entropy", "fKL hiH"),
]
PAIRED_METRICS = ["pass@1", "pass@8", "distinct_correct", "token_entropy", "high_entropy_ratio_own"]
# Learning rates at which each base term trains stably here: the sampled estimator's single-sample gradient is much
# noisier than the analytic one, and at 1e-3 it drove both students below their initialisation.
DEFAULT_LEARNING_RATE = {"analytic": 1e-3, "sampled": 3e-4}


def secondary_prefix(top_p: float) -> str:
    """Key prefix of the metrics measured under the second evaluation protocol, e.g. `top_p1/pass@8`."""
    return f"top_p{top_p:g}/"


@dataclass
class DemoSettings:
    """Every knob of one demo run; saved verbatim in the JSON."""

    steps: int = 200
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"
    quick: bool = False
    batch_size: int = 32
    # None: DEFAULT_LEARNING_RATE of the base term.
    learning_rate: float | None = None
    entropy_threshold: float = 0.8
    reverse_kl_estimator: str = "analytic"
    # The paper's forward KL: over the teacher's 16 most likely tokens, renormalised. None: the full vocabulary.
    forward_kl_top_k: int | None = 16
    # The paper's evaluation: temperature 1.0, top-p 0.8.
    eval_top_p: float = 0.8
    # A second evaluation protocol reported beside the first (None: none); top-p 1.0 samples the students' own
    # distribution, the one both methods train on.
    secondary_eval_top_p: float | None = 1.0
    student_layers: int = STUDENT_SIZE["num_hidden_layers"]
    max_new_tokens: int = 26
    num_eval_problems: int = 128
    num_eval_samples: int = 16
    student_warmup_steps: int = 600
    student_warmup_lr: float = 3e-3
    teacher_path: str | None = None

    def __post_init__(self):
        if self.reverse_kl_estimator not in DEFAULT_LEARNING_RATE:
            raise ValueError(
                f"reverse_kl_estimator must be one of {sorted(DEFAULT_LEARNING_RATE)}; "
                f"got {self.reverse_kl_estimator!r}."
            )
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE[self.reverse_kl_estimator]
        if not 0 < self.eval_top_p <= 1 or (
            self.secondary_eval_top_p is not None and not 0 < self.secondary_eval_top_p <= 1
        ):
            raise ValueError(
                f"eval_top_p and secondary_eval_top_p must be in (0, 1]; got {self.eval_top_p} and "
                f"{self.secondary_eval_top_p}."
            )
        if self.student_layers < 1 or self.steps < 1:
            raise ValueError(f"student_layers and steps must be >= 1; got {self.student_layers} and {self.steps}.")
        if self.num_eval_samples < 8:
            raise ValueError(f"num_eval_samples must be >= 8 (pass@8 needs 8 samples); got {self.num_eval_samples}.")
        if self.secondary_eval_top_p == self.eval_top_p:
            self.secondary_eval_top_p = None

    @classmethod
    def quick_settings(cls, **overrides) -> DemoSettings:
        """Small enough for CI (about 20 seconds), still every stage: warm-up, both trainings, evaluation, plots."""
        values = dict(
            steps=6,
            seeds=[0, 1],
            quick=True,
            num_eval_problems=24,
            num_eval_samples=8,
            student_warmup_steps=30,
            batch_size=16,
        )
        values.update(overrides)
        return cls(**values)


def _distill(
    student_path: Path,
    teacher,
    tokenizer,
    settings: DemoSettings,
    method: str,
    seed: int,
    output_dir: Path,
    on_step=None,
):
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from .. import EOPDConfig, EOPDTrainer

    student = load_model(student_path)
    rows = training_rows_fn(set())(0, random.Random(50_000 + seed), settings.steps * settings.batch_size)
    threshold = math.inf if method == "opd" else settings.entropy_threshold
    args = EOPDConfig(
        output_dir=str(output_dir),
        entropy_threshold=threshold,
        # Both runs report their high-entropy shares at the evaluation's threshold, whether or not the gate is on.
        monitor_entropy_threshold=settings.entropy_threshold,
        reverse_kl_estimator=settings.reverse_kl_estimator,
        forward_kl_top_k=settings.forward_kl_top_k,
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
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    if on_step is not None:

        class _ReportStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                on_step(state.global_step, state.max_steps)

        trainer.add_callback(_ReportStep())
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


def format_paired(paired: dict, metrics=PAIRED_METRICS, prefixes=("",)) -> str:
    """One line per metric: mean difference EOPD - OPD, its 95% interval and how many seeds EOPD won."""
    lines = [f"{'EOPD - OPD':<32}{'mean':>9}{'95% CI':>22}{'EOPD ahead':>12}"]
    for prefix in prefixes:
        for metric in metrics:
            stat = paired.get(prefix + metric)
            if stat is None:
                continue
            interval = "n/a" if stat["ci_low"] is None else f"[{stat['ci_low']:+.3f}, {stat['ci_high']:+.3f}]"
            lines.append(
                f"{prefix + metric:<32}{stat['mean']:>+9.3f}{interval:>22}"
                f"{str(stat['wins']) + '/' + str(stat['n_seeds']):>12}"
            )
    return "\n".join(lines)


class DemoContext:
    """What every seed shares: the teacher, its tokenizer and the held-out problems."""

    def __init__(self, settings: DemoSettings, output_dir: Path, log=print):
        from transformers import AutoTokenizer

        self.settings = settings
        self.device = torch.device(settings.device)
        teacher_path = Path(settings.teacher_path) if settings.teacher_path else ASSETS_TEACHER
        if not (teacher_path / "config.json").exists():
            # Only reached if the shipped checkpoint was removed; the quick run keeps the pipeline but not the quality.
            log(
                f"No teacher at {teacher_path}; training one from scratch (scripts/make_demo_teacher.py does the same)."
            )
            teacher_path = train_teacher(output_dir / "teacher", steps=60 if settings.quick else 2500)
        self.teacher_path = teacher_path
        self.tokenizer = AutoTokenizer.from_pretrained(str(teacher_path))
        self.teacher = load_model(teacher_path).to(self.device)
        self.problems = eval_problems(settings.num_eval_problems)

    def evaluate(self, model, seed: int) -> dict:
        """The paper's protocol, then the second one with its metrics under `secondary_prefix`."""
        s = self.settings
        kwargs = dict(
            num_samples=s.num_eval_samples,
            max_new_tokens=s.max_new_tokens,
            entropy_threshold=s.entropy_threshold,
            ks=KS,
            seed=1_000 + seed,
        )
        model = model.to(self.device)
        result = evaluate(model, self.teacher, self.tokenizer, self.problems, top_p=s.eval_top_p, **kwargs)
        if s.secondary_eval_top_p is not None:
            extra = evaluate(
                model, self.teacher, self.tokenizer, self.problems, top_p=s.secondary_eval_top_p, **kwargs
            )
            result.update({secondary_prefix(s.secondary_eval_top_p) + key: value for key, value in extra.items()})
        return result


def run_seed(context: DemoContext, seed: int, output_dir: Path, stages=None) -> dict[str, dict]:
    """Evaluate the teacher, warm a student up, distil it with OPD and with EOPD; every model's numbers for `seed`."""
    settings, tokenizer = context.settings, context.tokenizer

    def stage(label):
        if stages is not None:
            stages.set_postfix_str(f"seed {seed}: {label}")

    def done():
        if stages is not None:
            stages.update()

    results = {}
    stage("teacher eval")
    results["teacher"] = context.evaluate(context.teacher, seed)
    done()

    stage("student warm-up")
    size = STUDENT_SIZE | {"num_hidden_layers": settings.student_layers}
    student = build_model(tokenizer, size, seed=seed)
    supervised_train(
        student,
        tokenizer,
        training_rows_fn(set()),
        steps=settings.student_warmup_steps,
        batch_size=64,
        learning_rate=settings.student_warmup_lr,
        seed=seed,
        warmup_steps=min(50, settings.student_warmup_steps // 5),
        progress="student warm-up",
    )
    init_path = output_dir / "student_init" / f"seed{seed}"
    student.save_pretrained(str(init_path))
    tokenizer.save_pretrained(str(init_path))
    results["student_init"] = context.evaluate(student, seed)
    done()

    for method in METHODS:
        label = f"{method.upper()} distillation"
        stage(label)
        model, log_history = _distill(
            init_path,
            context.teacher,
            tokenizer,
            settings,
            method,
            seed,
            output_dir / "runs" / f"{method}-seed{seed}",
            on_step=lambda step, total, label=label: stage(f"{label}, step {step}/{total}"),
        )
        results[method] = {**context.evaluate(model, seed), "log_history": log_history}
        done()
    return results


def aggregate(per_seed: dict[str, list[dict]]) -> dict:
    """Mean/std per model and metric, the paired difference EOPD - OPD, and each method's paired gain over its init."""
    summary = {}
    for model, results in per_seed.items():
        keys = [k for k in results[0] if k != "log_history"]
        summary[model] = {key: _summarise([r[key] for r in results]) for key in keys}
    return {
        "summary": summary,
        "paired_difference": paired_differences(per_seed["opd"], per_seed["eopd"]),
        "gain_over_init": {
            method: paired_differences(per_seed["student_init"], per_seed[method]) for method in METHODS
        },
    }


def run_demo(settings: DemoSettings, output_dir: str | Path, log=print) -> dict:
    """Run the whole comparison, write `results.json` and the PNGs into `output_dir`, and return the results."""
    from tqdm.auto import tqdm

    start = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    context = DemoContext(settings, output_dir, log=log)

    per_seed = {model: [] for model in MODELS}
    stages = tqdm(total=len(settings.seeds) * STAGES_PER_SEED, desc="demo", unit="stage")
    for seed in settings.seeds:
        for model, result in run_seed(context, seed, output_dir, stages).items():
            per_seed[model].append(result)
    stages.set_postfix_str("done")
    stages.close()

    aggregated = aggregate(per_seed)
    training_curves = {
        method: [curves_from_log_history(r["log_history"]) for r in per_seed[method]] for method in METHODS
    }
    plot_training_curves(training_curves, output_dir / "training_curves.png")
    plot_pass_at_k(aggregated["summary"], KS, output_dir / "pass_at_k.png", top_p=settings.eval_top_p)
    plot_paired_differences(
        {"": aggregated["paired_difference"]}, output_dir / "paired_difference.png", top_p=settings.eval_top_p
    )
    plot_mechanism({"": aggregated["summary"]}, output_dir / "mechanism.png", top_p=settings.eval_top_p)
    results = {
        "settings": asdict(settings) | {"entropy_threshold_opd": "inf"},
        "task": {
            "eval_problems": len(context.problems),
            "samples_per_problem": settings.num_eval_samples,
            "eos": IM_END,
            "teacher_path": str(context.teacher_path),
        },
        **aggregated,
        "per_seed": per_seed,
        "wall_time_s": time.time() - start,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results
