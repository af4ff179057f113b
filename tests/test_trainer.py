"""EOPDTrainer end to end on tiny local models, loaded through the real `from_pretrained` path."""

import logging
import math
import re
import warnings

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDTrainer

from trl_eopd import EOPDConfig, EOPDTrainer, eopd_loss, eopd_loss_and_stats
from trl_eopd.tiny import EOS_TOKEN, IM_END, save_tiny_setup

EOPD_METRICS = [
    "eopd/teacher_entropy",
    "eopd/student_entropy",
    "eopd/high_entropy_ratio",
    "eopd/reverse_kl",
    "eopd/forward_kl",
    "eopd/forward_kl_high_entropy",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_setup(tmp_path_factory.mktemp("tiny"), num_examples=32)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny["student"])


@pytest.fixture(scope="module")
def dataset(tiny):
    return load_dataset("json", data_files=tiny["dataset"], split="train")


def make_args(output_dir, **overrides):
    defaults = dict(
        output_dir=str(output_dir),
        bf16=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        max_new_tokens=12,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    defaults.update(overrides)
    return EOPDConfig(**defaults)


def make_trainer(tiny, tokenizer, dataset, output_dir, eval_dataset=None, **overrides):
    return EOPDTrainer(
        model=tiny["student"],
        teacher_model=tiny["teacher"],
        args=make_args(output_dir, **overrides),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def trainer_loss_and_full_logits(trainer):
    """The trainer's loss on its first batch, and both models' own full logits on that batch, to recompute it from."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student_logits = trainer.model(**model_inputs).logits
        teacher_logits = trainer.teacher_model(**model_inputs).logits
    return loss, student_logits, teacher_logits, batch


GKD_SCRIPT = """
from datasets import load_dataset
from transformers import AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer

tokenizer = AutoTokenizer.from_pretrained(STUDENT)
dataset = load_dataset("json", data_files=DATASET, split="train")
args = GKDConfig(output_dir=OUTPUT_DIR, bf16=False, per_device_train_batch_size=2, max_steps=2, max_new_tokens=8,
                 report_to=[], save_strategy="no", logging_steps=1)
trainer = GKDTrainer(model=STUDENT, teacher_model=TEACHER, args=args, train_dataset=dataset,
                     processing_class=tokenizer)
trainer.train()
"""


def test_a_working_gkd_script_becomes_eopd_by_swapping_the_two_classes(tiny, tmp_path, monkeypatch):
    eopd_script = (
        GKD_SCRIPT.replace("from trl.experimental.gkd import", "from trl_eopd import")
        .replace("GKDConfig", "EOPDConfig")
        .replace("GKDTrainer", "EOPDTrainer")
    )
    changed = [(a, b) for a, b in zip(GKD_SCRIPT.splitlines(), eopd_script.splitlines()) if a != b]
    assert len(changed) == 3  # the import line, the config line and the trainer line; nothing else

    recorded = []
    original_compute_loss = EOPDTrainer.compute_loss

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        loss = original_compute_loss(self, model, inputs, *args, **kwargs)
        if model.training and not recorded:
            recorded.append(({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}, loss.detach()))
        return loss

    monkeypatch.setattr(EOPDTrainer, "compute_loss", recording_compute_loss)
    for name, script in (("gkd", GKD_SCRIPT), ("eopd", eopd_script)):
        namespace = {
            "STUDENT": tiny["student"],
            "TEACHER": tiny["teacher"],
            "DATASET": tiny["dataset"],
            "OUTPUT_DIR": str(tmp_path / name),
        }
        exec(compile(script, f"<{name} script>", "exec"), namespace)
        trainer = namespace["trainer"]
        assert trainer.state.global_step == 2
    assert type(trainer).__name__ == "EOPDTrainer"
    # The swapped script trains with EOPD's loss at the paper's defaults: its first logged loss and metrics equal the
    # EOPD loss recomputed from the initial models' full logits on the very completions it sampled.
    assert (trainer.args.lmbda, trainer.args.beta, trainer.args.temperature) == (1.0, 1.0, 1.0)
    assert trainer.args.forward_kl_top_k == 16
    batch, trained_loss = recorded[0]
    student = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student_logits, teacher_logits = student(**model_inputs).logits, teacher(**model_inputs).logits
    expected, stats = eopd_loss_and_stats(
        student_logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], forward_kl_top_k=16
    )
    first_log = trainer.state.log_history[0]
    torch.testing.assert_close(trained_loss, expected, rtol=1e-5, atol=1e-6)
    assert first_log["loss"] == pytest.approx(float(expected), rel=1e-5)
    for key, value in stats.means().items():
        assert first_log[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # GKD's own loss on the same completions (its defaults: beta=0.5) is another number: the swap changed the loss.
    gkd = GKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1], teacher_logits[:, :-1], labels=batch["labels"][:, 1:]
    )
    assert abs(float(gkd) - float(expected)) > 1e-3


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_train_save_reload_and_resume(tiny, tokenizer, dataset, tmp_path, memory_efficient):
    trainer = make_trainer(
        tiny,
        tokenizer,
        dataset,
        tmp_path,
        eval_dataset=dataset.select(range(8)),
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        memory_efficient_loss=memory_efficient,
    )
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert len(train_logs) == 4 and eval_logs
    for key in EOPD_METRICS:
        assert all(math.isfinite(log[key]) for log in train_logs), key
        assert math.isfinite(eval_logs[-1][f"eval_{key}"]), key
    assert all(0.0 <= log["eopd/high_entropy_ratio"] <= 1.0 for log in train_logs)

    final_dir = tmp_path / "final"
    trainer.save_model(str(final_dir))
    reloaded = AutoModelForCausalLM.from_pretrained(final_dir)
    probe = tokenizer("Ada has 3 coins", return_tensors="pt")
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, trained(**probe).logits)
    # Training changed the student: the reload must not simply equal the initial checkpoint.
    initial = AutoModelForCausalLM.from_pretrained(tiny["student"])
    with torch.no_grad():
        assert not torch.allclose(initial(**probe).logits, reloaded(**probe).logits)

    # Resuming from the middle replays the uninterrupted run exactly: same weights, same random state, so the
    # same on-policy samples and the same losses.
    resumed = make_trainer(
        tiny, tokenizer, dataset, tmp_path / "resumed", max_steps=4, memory_efficient_loss=memory_efficient
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    # The history restored from the checkpoint holds steps 1-2; the last two entries are the ones trained now.
    resumed_losses = {log["step"]: log["loss"] for log in resumed.state.log_history if "loss" in log}
    original_losses = {log["step"]: log["loss"] for log in train_logs}
    assert [log["step"] for log in resumed.state.log_history if "loss" in log][-2:] == [3, 4]
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(original_losses[step], rel=1e-5)


def test_migration_warning_is_not_shown(tiny, tokenizer, dataset, tmp_path, caplog):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    with caplog.at_level(logging.WARNING):
        GKDTrainer(
            model=tiny["student"],
            teacher_model=tiny["teacher"],
            train_dataset=dataset,
            processing_class=tokenizer,
            args=GKDConfig(output_dir=str(tmp_path / "gkd"), bf16=False, lmbda=1.0, temperature=1.0, report_to=[]),
        )
    # The check below can only mean something if GKDTrainer really says it in this setting.
    assert any("DistillationTrainer" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_trainer(tiny, tokenizer, dataset, tmp_path)
    assert not any("DistillationTrainer" in record.getMessage() for record in caplog.records)


def test_num_items_counts_the_generated_completion_tokens(tiny, tokenizer, dataset, tmp_path):
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, per_device_train_batch_size=2)
    dataloader = trainer.get_train_dataloader()
    batch_samples, num_items = trainer.get_batch_samples(iter(dataloader), 2, trainer.args.device)
    assert len(batch_samples) == 2
    expected = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batch_samples)
    assert int(num_items) == expected
    # The batches now hold the student's own completions: prompt plus at most max_new_tokens generated tokens.
    for batch in batch_samples:
        assert batch["input_ids"].shape[1] <= batch["prompts"].shape[1] + trainer.args.max_new_tokens
        assert (batch["labels"][:, : batch["prompts"].shape[1]] == -100).all()


def test_on_policy_window_count_is_the_generated_tokens(tiny, tokenizer, dataset, tmp_path):
    """The window's count is the number of tokens the student generated: each row's completion up to and including its
    first stop token, read off the generated sequences, not from the labels the implementation counts."""
    trainer = make_trainer(
        tiny, tokenizer, dataset, tmp_path, per_device_train_batch_size=2, lmbda=1.0, max_new_tokens=12
    )
    rows_per_window = 2 * 2
    batch_samples, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, trainer.args.device)
    stop_ids = set(trainer.generation_config.eos_token_id)
    expected, stopped_early = 0, 0
    for batch in batch_samples:
        for generated in batch["input_ids"][:, batch["prompts"].shape[1] :].tolist():
            stops = [i for i, token in enumerate(generated) if token in stop_ids]
            expected += stops[0] + 1 if stops else trainer.args.max_new_tokens
            stopped_early += bool(stops)
    assert int(num_items) == expected
    # The dataset's own completions (what transformers would count) have another length: the check can tell them apart.
    dataset_count = (
        sum(int((trainer.data_collator([row])["labels"][0, 1:] != -100).sum()) for row in dataset)
        / len(dataset)
        * rows_per_window
    )
    assert abs(expected - dataset_count) > 2
    assert 0 < expected <= rows_per_window * trainer.args.max_new_tokens


def _uneven_dataset():
    rows = []
    for index, answer_length in enumerate([1, 30, 3, 40]):
        answer = " ".join(["7"] * answer_length)
        rows.append(
            {"messages": [{"role": "user", "content": f"Count {index}"}, {"role": "assistant", "content": answer}]}
        )
    return Dataset.from_list(rows)


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_gradient_accumulation_weights_every_token_equally(tiny, tokenizer, tmp_path, memory_efficient):
    """One step on 4 sequences equals two accumulated micro-batches of 2, although their token counts differ a lot."""
    dataset = _uneven_dataset()
    weights = {}
    for name, batch_size, accumulation in (("full", 4, 1), ("accumulated", 2, 2)):
        trainer = make_trainer(
            tiny,
            tokenizer,
            dataset,
            tmp_path / name,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            lmbda=0.0,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            memory_efficient_loss=memory_efficient,
        )
        trainer.train()
        weights[name] = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny["student"]).named_parameters())
    moved = max((weights["full"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4
    for key in weights["full"]:
        torch.testing.assert_close(weights["accumulated"][key], weights["full"][key], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: token-weighted over the logging window, checked against a float64 computation from both models' logits

ALL_METRICS = EOPD_METRICS + [
    "eopd/loss_base",
    "eopd/loss_forward_gated",
    "eopd/monitor/teacher_high_entropy_ratio",
    "eopd/monitor/student_high_entropy_ratio",
    "eopd/monitor/forward_kl_teacher_high_entropy",
]


def _per_token_float64(tiny, collator, rows, top_k):
    """Per completion token of each row, from each row alone (no padding), with both models in float64."""
    student = AutoModelForCausalLM.from_pretrained(tiny["student"]).double().eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).double().eval()
    names = ("teacher_entropy", "student_entropy", "reverse_kl", "forward_kl", "forward_top_k")
    columns = {name: [] for name in names}
    for row in rows:
        batch = collator([row])
        mask = batch["labels"][0, 1:] != -100
        with torch.no_grad():
            log_q = torch.log_softmax(student(input_ids=batch["input_ids"]).logits[0, :-1][mask], -1)
            log_p = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[0, :-1][mask], -1)
        q, p = log_q.exp(), log_p.exp()
        top_log_p, top_ids = log_p.topk(top_k, -1)
        renormalised = top_log_p - torch.logsumexp(top_log_p, -1, keepdim=True)
        columns["teacher_entropy"].append(-(p * log_p).sum(-1))
        columns["student_entropy"].append(-(q * log_q).sum(-1))
        columns["reverse_kl"].append((q * (log_q - log_p)).sum(-1))
        columns["forward_kl"].append((p * (log_p - log_q)).sum(-1))
        columns["forward_top_k"].append((renormalised.exp() * (renormalised - log_q.gather(-1, top_ids))).sum(-1))
    return columns


def _threshold_in_a_gap(values, low=0.1, high=0.9):
    """A threshold at the widest gap between neighbouring values in the `low`-`high` quantile range, so that float32
    rounding cannot move a token across it."""
    ordered = values.sort().values
    middle = ordered[int(low * len(ordered)) : int(high * len(ordered)) + 1]
    gaps = middle[1:] - middle[:-1]
    i = int(gaps.argmax())
    assert gaps[i] > 2e-5  # float32 entropies of a 320-token vocabulary are within ~1e-6 of float64
    return float((middle[i] + middle[i + 1]) / 2)


def _hand_metrics(columns, *, entropy_threshold, monitor_threshold):
    cat = {name: torch.cat(values) for name, values in columns.items()}
    gate = (cat["teacher_entropy"] > entropy_threshold).double()
    teacher_high = (cat["teacher_entropy"] > monitor_threshold).double()
    n = len(gate)
    return {
        "eopd/teacher_entropy": float(cat["teacher_entropy"].sum()) / n,
        "eopd/student_entropy": float(cat["student_entropy"].sum()) / n,
        "eopd/high_entropy_ratio": float(gate.sum()) / n,
        "eopd/reverse_kl": float(cat["reverse_kl"].sum()) / n,
        "eopd/forward_kl": float(cat["forward_kl"].sum()) / n,
        "eopd/forward_kl_high_entropy": float((gate * cat["forward_kl"]).sum()) / max(float(gate.sum()), 1.0),
        "eopd/loss_base": float(cat["reverse_kl"].sum()) / n,
        "eopd/loss_forward_gated": float((gate * cat["forward_top_k"]).sum()) / n,
        "eopd/monitor/teacher_high_entropy_ratio": float(teacher_high.sum()) / n,
        "eopd/monitor/student_high_entropy_ratio": float((cat["student_entropy"] > monitor_threshold).sum()) / n,
        "eopd/monitor/forward_kl_teacher_high_entropy": (
            float((teacher_high * cat["forward_kl"]).sum()) / max(float(teacher_high.sum()), 1.0)
        ),
    }


# (per-device batch size, gradient accumulation steps, optimizer steps per log): the same 4 rows in every logged
# window.
SPLITS = [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 1, 4)]


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_logged_metrics_are_token_weighted_whatever_the_split(tiny, tokenizer, tmp_path, memory_efficient):
    dataset = _uneven_dataset()  # completions of very different lengths: a mean of per-batch means would drift
    coef, top_k = 0.5, 4
    first = make_trainer(tiny, tokenizer, dataset, tmp_path / "probe")
    columns = _per_token_float64(tiny, first.data_collator, list(dataset), top_k)
    # Different thresholds for the gate and the monitor, so that neither set of metrics can stand in for the other.
    entropy_threshold = _threshold_in_a_gap(torch.cat(columns["teacher_entropy"]), 0.1, 0.5)
    monitor_threshold = _threshold_in_a_gap(torch.cat(columns["teacher_entropy"]), 0.5, 0.9)
    expected = _hand_metrics(columns, entropy_threshold=entropy_threshold, monitor_threshold=monitor_threshold)

    # The checks below can only fail on a mean of means if the rows' gated shares really differ.
    row_ratios = [float((h > entropy_threshold).double().mean()) for h in columns["teacher_entropy"]]
    assert abs(sum(row_ratios) / len(row_ratios) - expected["eopd/high_entropy_ratio"]) > 0.02
    for key in ("eopd/high_entropy_ratio", "eopd/monitor/teacher_high_entropy_ratio"):
        assert 0.0 < expected[key] < 1.0, key
    assert expected["eopd/high_entropy_ratio"] != expected["eopd/monitor/teacher_high_entropy_ratio"]

    for batch_size, accumulation, steps in SPLITS:
        trainer = make_trainer(
            tiny,
            tokenizer,
            dataset,
            tmp_path / f"{batch_size}x{accumulation}x{steps}",
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=steps,
            logging_steps=steps,
            lmbda=0.0,
            optim="sgd",
            learning_rate=0.0,
            entropy_threshold=entropy_threshold,
            forward_kl_coef=coef,
            forward_kl_top_k=top_k,
            monitor_entropy_threshold=monitor_threshold,
            memory_efficient_loss=memory_efficient,
        )
        trainer.train()
        (log,) = [log for log in trainer.state.log_history if "loss" in log]
        eval_log = trainer.evaluate(dataset)
        split = f"batch {batch_size} x accumulation {accumulation} x {steps} steps per log"
        for key in ALL_METRICS:
            assert log[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (split, key)
            assert eval_log[f"eval_{key}"] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (split, key)
        if steps > 1:
            continue  # the Trainer's `loss` is then a mean of per-step values, not token-weighted (see README)
        # The loss is read from its parts: base term + forward_kl_coef * gated forward term (top-k included).
        assert log["loss"] == pytest.approx(log["eopd/loss_base"] + coef * log["eopd/loss_forward_gated"], rel=1e-5)
        assert log["loss"] == pytest.approx(
            expected["eopd/loss_base"] + coef * expected["eopd/loss_forward_gated"], rel=1e-5
        )


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_opd_run_reports_high_entropy_shares_at_the_monitoring_threshold(tiny, tokenizer, tmp_path, memory_efficient):
    """With the gate off (OPD) the gate's metrics are 0; the monitoring ones equal an EOPD run's on the same data."""
    dataset = _uneven_dataset()
    columns = _per_token_float64(
        tiny, make_trainer(tiny, tokenizer, dataset, tmp_path / "probe").data_collator, list(dataset), top_k=4
    )
    monitor_threshold = _threshold_in_a_gap(torch.cat(columns["teacher_entropy"]))
    expected = _hand_metrics(columns, entropy_threshold=math.inf, monitor_threshold=monitor_threshold)
    logs = {}
    for name, threshold in (("opd", math.inf), ("eopd", 0.0)):
        trainer = make_trainer(
            tiny,
            tokenizer,
            dataset,
            tmp_path / name,
            max_steps=1,
            lmbda=0.0,
            optim="sgd",
            learning_rate=0.0,
            entropy_threshold=threshold,
            monitor_entropy_threshold=monitor_threshold,
            memory_efficient_loss=memory_efficient,
        )
        trainer.train()
        (logs[name],) = [log for log in trainer.state.log_history if "loss" in log]
    opd = logs["opd"]
    assert opd["eopd/high_entropy_ratio"] == 0.0 and opd["eopd/forward_kl_high_entropy"] == 0.0
    assert opd["eopd/loss_forward_gated"] == 0.0
    assert 0.0 < expected["eopd/monitor/teacher_high_entropy_ratio"] < 1.0
    for key in (
        "eopd/monitor/teacher_high_entropy_ratio",
        "eopd/monitor/student_high_entropy_ratio",
        "eopd/monitor/forward_kl_teacher_high_entropy",
    ):
        assert opd[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        assert logs["eopd"][key] == pytest.approx(opd[key], rel=1e-5, abs=1e-6), key
    assert logs["eopd"]["eopd/high_entropy_ratio"] == 1.0  # every token gated at threshold 0: the gate moved


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_temperature_and_options_reach_the_loss(tiny, tokenizer, dataset, tmp_path, memory_efficient):
    options = dict(temperature=2.0, entropy_threshold=4.0, forward_kl_top_k=5, gate="switch", forward_kl_coef=0.5)
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, memory_efficient_loss=memory_efficient, **options)
    loss, student_logits, teacher_logits, batch = trainer_loss_and_full_logits(trainer)
    expected = eopd_loss(student_logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], **options)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    unscaled = eopd_loss(
        student_logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], **{**options, "temperature": 1.0}
    )
    assert not torch.allclose(loss, unscaled)


def test_teacher_eos_replaces_the_student_eos_in_completions(tiny, tokenizer, dataset, tmp_path):
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, teacher_eos_token=IM_END, max_new_tokens=24)
    student_eos, teacher_eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)
    assert {student_eos, teacher_eos} <= set(trainer.generation_config.eos_token_id)
    input_ids = torch.tensor([[5, 6, student_eos, student_eos, 0], [5, student_eos, 7, 8, student_eos]])
    labels = torch.tensor([[-100, -100, student_eos, -100, -100], [-100, student_eos, 7, 8, student_eos]])
    trainer._replace_student_eos(input_ids, labels)
    assert input_ids.tolist() == [[5, 6, teacher_eos, student_eos, 0], [5, teacher_eos, 7, 8, teacher_eos]]
    assert labels.tolist() == [[-100, -100, teacher_eos, -100, -100], [-100, teacher_eos, 7, 8, teacher_eos]]
    with pytest.raises(ValueError, match="teacher_eos_token"):
        make_trainer(tiny, tokenizer, dataset, tmp_path, teacher_eos_token="<|not-a-token|>")


def test_peft_student_trains_only_the_adapter(tiny, tokenizer, dataset, tmp_path):
    from peft import LoraConfig

    trainer = EOPDTrainer(
        model=tiny["student"],
        teacher_model=tiny["teacher"],
        args=make_args(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    assert changed and all("lora_" in k for k in changed)
    assert trainer._memory_efficient  # the adapter is not on the head, so the chunked path stays exact


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_dataset_without_messages_column_is_named(tiny, tokenizer, tmp_path):
    bad = Dataset.from_list([{"question": "1+1?", "answer": "2"}])
    with pytest.raises(ValueError, match=r"train_dataset.*\['answer', 'question'\].*messages"):
        make_trainer(tiny, tokenizer, bad, tmp_path)


def test_tokenizer_without_pad_token_is_rejected(tiny, dataset, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        make_trainer(tiny, tokenizer, dataset, tmp_path)


def test_different_vocabularies_are_rejected(tiny, tokenizer, dataset, tmp_path):
    from trl_eopd.tiny import build_tiny_model, build_tiny_tokenizer

    other = build_tiny_model(build_tiny_tokenizer(vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size"):
        EOPDTrainer(
            model=tiny["student"],
            teacher_model=other,
            args=make_args(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_wrong_config_class_is_rejected(tiny, tokenizer, dataset, tmp_path):
    from trl.experimental.gkd import GKDConfig

    with pytest.raises(TypeError, match="EOPDConfig"):
        EOPDTrainer(
            model=tiny["student"],
            teacher_model=tiny["teacher"],
            args=GKDConfig(output_dir=str(tmp_path), bf16=False),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
@pytest.mark.parametrize("broken", ["student", "teacher"])
def test_non_finite_loss_names_the_model_with_bad_logits(tiny, tokenizer, dataset, tmp_path, broken, memory_efficient):
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, memory_efficient_loss=memory_efficient)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer._memory_efficient_is_exact(trainer.model, batch)  # decide the path on healthy weights
    model = trainer.model if broken == "student" else trainer.teacher_model
    with torch.no_grad():
        model.get_output_embeddings().weight[7].fill_(float("nan"))
    other = "teacher" if broken == "student" else "student"
    with pytest.raises(FloatingPointError, match=f"the {broken}'s logits are non-finite") as error:
        trainer.compute_loss(trainer.model, batch)
    assert f"the {other}'s logits" not in str(error.value)


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_infinite_threshold_trainer_loss_is_gkds_loss(tiny, tokenizer, dataset, tmp_path, memory_efficient, beta):
    from trl.experimental.gkd import GKDTrainer

    trainer = make_trainer(
        tiny,
        tokenizer,
        dataset,
        tmp_path,
        entropy_threshold=float("inf"),
        beta=beta,
        memory_efficient_loss=memory_efficient,
    )
    loss, student_logits, teacher_logits, batch = trainer_loss_and_full_logits(trainer)
    gkd = GKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1], teacher_logits[:, :-1], labels=batch["labels"][:, 1:], beta=beta
    )
    torch.testing.assert_close(loss, gkd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_gate_off_trainer_loss_is_gkd_trainers_only_at_temperature_one(
    tiny, tokenizer, dataset, tmp_path, temperature
):
    from trl.experimental.gkd import GKDConfig

    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, entropy_threshold=float("inf"), temperature=temperature)
    loss, student_logits, teacher_logits, batch = trainer_loss_and_full_logits(trainer)
    gkd = GKDTrainer(
        model=tiny["student"],
        teacher_model=tiny["teacher"],
        train_dataset=dataset,
        processing_class=tokenizer,
        args=GKDConfig(output_dir=str(tmp_path / "gkd"), bf16=False, beta=1.0, temperature=temperature, report_to=[]),
    )
    gkd.model.eval()
    with torch.no_grad():
        gkd_loss = gkd.compute_loss(gkd.model, batch)
    if temperature == 1.0:
        torch.testing.assert_close(loss, gkd_loss, rtol=1e-5, atol=1e-6)
    else:
        # GKD samples at 0.9 but scores at 1; EOPD scores at 0.9 too, as the float64 reference does.
        assert not torch.allclose(loss, gkd_loss, rtol=1e-3, atol=0)
        expected = _float64_loss(trainer, student_logits, teacher_logits, batch, None)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


class _HeadWithExtraWork(torch.nn.Module):
    """An output layer that is not a bare `torch.nn.Linear` (as a quantised or adapted head would be)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    @property
    def weight(self):
        return self.linear.weight

    def forward(self, hidden):
        return self.linear(hidden) * 0.5


def test_output_layer_that_is_not_plain_linear_falls_back_with_one_warning(tiny, tokenizer, dataset, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    teacher.lm_head = _HeadWithExtraWork(teacher.lm_head)
    trainer = EOPDTrainer(
        model=tiny["student"],
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    fallback = [str(w.message) for w in caught if "falls back to the exact full-logits path" in str(w.message)]
    assert len(fallback) == 1, fallback  # said once, with the reason, not at every step
    assert "the teacher's output layer cannot be projected directly (it is a _HeadWithExtraWork" in fallback[0]
    assert not trainer._memory_efficient
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_logits_scaled_outside_the_head_are_detected(tiny, tokenizer, dataset, tmp_path):
    """A model that rescales its logits without announcing it in its config must not get the chunked path."""
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path)
    original_forward = trainer.teacher_model.forward

    def scaled_forward(*args, **kwargs):
        outputs = original_forward(*args, **kwargs)
        outputs.logits = outputs.logits * 3.0
        return outputs

    trainer.teacher_model.forward = scaled_forward
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with pytest.warns(UserWarning, match="teacher's logits are not a plain projection"):
        assert not trainer._memory_efficient_is_exact(trainer.model, batch)


@pytest.mark.parametrize("field", ["train_dataset", "eval_dataset"])
def test_empty_dataset_is_named(tiny, tokenizer, dataset, tmp_path, field):
    empty = dataset.select([])
    kwargs = {"train_dataset": dataset, "eval_dataset": None, field: empty}
    with pytest.raises(ValueError, match=rf"`{field}` is empty \(0 rows\)"):
        EOPDTrainer(
            model=tiny["student"],
            teacher_model=tiny["teacher"],
            args=make_args(tmp_path),
            processing_class=tokenizer,
            **kwargs,
        )


@pytest.mark.parametrize("field", ["model", "teacher_model"])
def test_model_path_that_does_not_exist_is_named(tiny, tokenizer, dataset, tmp_path, field):
    missing = str(tmp_path / "no-such-model")
    kwargs = {"model": tiny["student"], "teacher_model": tiny["teacher"], field: missing}
    with pytest.raises(ValueError, match=rf"`{field}` is '{missing}', a local path that does not exist"):
        EOPDTrainer(args=make_args(tmp_path), train_dataset=dataset, processing_class=tokenizer, **kwargs)


def _prompt_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _long_prompt_dataset(prompt_words: int, completion_words: int, rows: int = 4):
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": " ".join([f"q{i}"] * prompt_words)},
                    {"role": "assistant", "content": " ".join(["7"] * completion_words)},
                ]
            }
            for i in range(rows)
        ]
    )


def test_long_row_keeps_its_prompt_and_cuts_the_completion_with_a_count(tiny, tokenizer, tmp_path):
    dataset = _long_prompt_dataset(prompt_words=20, completion_words=30)
    row = dataset[0]
    prompt_ids = _prompt_ids(tokenizer, row["messages"])
    full_length = len(
        tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    max_length = len(prompt_ids) + 5
    assert full_length > max_length  # TRL's collator would cut this row's prompt from the left

    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, max_length=max_length)
    with pytest.warns(UserWarning, match=rf"4 of 4 rows in this batch .* longer than `max_length={max_length}`"):
        batch = trainer.data_collator(list(dataset))
    assert batch["prompts"][0].tolist() == list(prompt_ids)  # the whole prompt reaches generation
    assert batch["input_ids"].shape[1] == max_length
    assert int((batch["labels"][0] != -100).sum()) == 5  # the reference completion is what gets cut
    # One step trains on it: the prompt the student generates from is the full one.
    trainer.train()
    assert trainer.state.global_step == 2


def test_prompt_longer_than_max_length_is_an_error(tiny, tokenizer, tmp_path):
    dataset = _long_prompt_dataset(prompt_words=40, completion_words=2)
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, max_length=16)
    with pytest.raises(ValueError, match=r"A prompt has \d+ tokens, more than `max_length=16`"):
        trainer.train()


@pytest.mark.parametrize("broken", ["student", "teacher"])
def test_non_finite_weights_under_sampling_name_the_model(tiny, tokenizer, dataset, tmp_path, broken):
    # The teacher only samples with seq_kd=True, on the batches that are not on-policy.
    options = dict(lmbda=0.0, seq_kd=True) if broken == "teacher" else {}
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, **options)
    model = trainer.model if broken == "student" else trainer.teacher_model
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=rf"Sampling from the {broken} .* NaN or inf") as error:
        trainer.train()
    assert "lm_head.weight" in str(error.value) or "embed_tokens.weight" in str(error.value)
    assert isinstance(error.value.__cause__, RuntimeError)


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_window_without_completion_tokens_is_zero_loss_without_gradient(tiny, tokenizer, tmp_path, memory_efficient):
    """Every prompt fills `max_length`, so the dataset's completions are cut to nothing and no row has a loss token."""
    dataset = _long_prompt_dataset(prompt_words=6, completion_words=3)
    dataset = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "same prompt"}, m["messages"][1]]} for m in dataset]
    )
    prompt_length = len(_prompt_ids(tokenizer, dataset[0]["messages"]))
    trainer = make_trainer(
        tiny,
        tokenizer,
        dataset,
        tmp_path,
        max_length=prompt_length,
        lmbda=0.0,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        memory_efficient_loss=memory_efficient,
    )
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    empty = [str(w.message) for w in caught if "has no completion token" in str(w.message)]
    assert len(empty) == 1, empty  # once for the window, not once per micro-batch
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    assert log["loss"] == 0.0 and log["eopd/reverse_kl"] == 0.0
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter.detach(), before[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# Streaming datasets


def _generated_stream(rows):
    """A stream whose features are unknown until a row is read, as after `IterableDataset.map`."""
    from datasets import IterableDataset

    def generate():
        yield from rows

    stream = IterableDataset.from_generator(generate)
    assert stream.column_names is None
    return stream


@pytest.mark.parametrize("eval_form", ["stream", "dict"])
def test_streaming_train_and_eval_datasets_train_and_evaluate(tiny, tokenizer, dataset, tmp_path, eval_form):
    eval_rows = dataset.select(range(8))
    eval_stream = eval_rows.to_iterable_dataset()
    eval_dataset = (
        eval_stream if eval_form == "stream" else {"known": eval_stream, "unknown": _generated_stream(list(eval_rows))}
    )
    trainer = make_trainer(
        tiny, tokenizer, dataset.to_iterable_dataset(), tmp_path, eval_dataset=eval_dataset, max_steps=2
    )
    trainer.train()
    assert trainer.state.global_step == 2
    metrics = trainer.evaluate()
    # Every row of a stream is scored: its eval loss is that of the same rows as a map-style dataset.
    expected = trainer.evaluate(eval_dataset=eval_rows, metric_key_prefix="rows")["rows_loss"]
    names = ["eval_loss"] if eval_form == "stream" else ["eval_known_loss", "eval_unknown_loss"]
    for name in names:
        assert metrics[name] == pytest.approx(expected, rel=1e-5)
        assert math.isfinite(metrics[name.removesuffix("loss") + "eopd/teacher_entropy"])


def test_streaming_dataset_checks_read_no_row_of_the_training_pass(tiny, tokenizer, dataset, tmp_path):
    # Unknown features make the column check read a first row; training must still start at row 0.
    trainer = make_trainer(tiny, tokenizer, _generated_stream(list(dataset)), tmp_path)
    first = next(iter(trainer.get_train_dataloader()))
    expected = trainer.data_collator([dataset[i] for i in range(trainer.args.per_device_train_batch_size)])
    torch.testing.assert_close(first["prompts"], expected["prompts"], rtol=0, atol=0)


@pytest.mark.parametrize("field", ["train_dataset", "eval_dataset"])
@pytest.mark.parametrize("features", ["known", "unknown"])
def test_streaming_dataset_without_messages_column_is_named(tiny, tokenizer, dataset, tmp_path, field, features):
    rows = [{"question": "1+1?", "answer": "2"}] * 2
    bad = Dataset.from_list(rows).to_iterable_dataset() if features == "known" else _generated_stream(rows)
    streams = {"train_dataset": dataset.to_iterable_dataset(), "eval_dataset": None}
    streams[field] = bad if field == "train_dataset" else {"held_out": bad}
    name = field if field == "train_dataset" else f"{field}['held_out']"
    with pytest.raises(ValueError, match=rf"`{re.escape(name)}` has columns \['answer', 'question'\].*messages"):
        EOPDTrainer(
            model=tiny["student"],
            teacher_model=tiny["teacher"],
            args=make_args(tmp_path),
            processing_class=tokenizer,
            **streams,
        )


def test_streaming_dataset_with_malformed_messages_or_no_rows_is_named(tiny, tokenizer, tmp_path):
    malformed = Dataset.from_list([{"messages": [{"role": "user", "content": "1+1?"}]}] * 2).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"`train_dataset` column `messages` must hold lists of at least two"):
        make_trainer(tiny, tokenizer, malformed, tmp_path)
    with pytest.raises(ValueError, match=r"`train_dataset` is empty \(0 rows\)"):
        make_trainer(tiny, tokenizer, _generated_stream([]), tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# GKD's API


def test_generate_on_policy_outputs_is_gkds_static_method(tiny, tokenizer, dataset, tmp_path):
    import inspect

    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path)
    assert isinstance(inspect.getattr_static(EOPDTrainer, "generate_on_policy_outputs"), staticmethod)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    student = trainer.accelerator.unwrap_model(trainer.model)
    outputs = {}
    for cls in (EOPDTrainer, GKDTrainer):
        torch.manual_seed(3)
        outputs[cls] = cls.generate_on_policy_outputs(student, batch, trainer.generation_config)
    assert len(outputs[EOPDTrainer]) == 3
    for ours, gkds in zip(outputs[EOPDTrainer], outputs[GKDTrainer]):
        torch.testing.assert_close(ours, gkds, rtol=0, atol=0)
    input_ids, _, labels = outputs[EOPDTrainer]
    assert input_ids.shape[1] > batch["prompts"].shape[1]  # something was sampled
    assert (labels[:, : batch["prompts"].shape[1]] == -100).all()


# ---------------------------------------------------------------------------------------------------------------------
# num_items_in_batch outside the training loop


def _float64_loss(trainer, student_logits, teacher_logits, batch, num_items_in_batch):
    from reference import reference_eopd_loss

    args = trainer.args
    return reference_eopd_loss(
        student_logits[:, :-1],
        teacher_logits[:, :-1],
        batch["labels"][:, 1:],
        entropy_threshold=args.entropy_threshold,
        forward_kl_coef=args.forward_kl_coef,
        gate=args.gate,
        beta=args.beta,
        temperature=args.temperature,
        forward_kl_top_k=args.forward_kl_top_k,
        reverse_kl_estimator=args.reverse_kl_estimator,
        num_items_in_batch=num_items_in_batch,
    ).float()


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_eval_mode_compute_loss_divides_by_the_given_num_items(tiny, tokenizer, dataset, tmp_path, memory_efficient):
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, memory_efficient_loss=memory_efficient)
    per_token, student_logits, teacher_logits, batch = trainer_loss_and_full_logits(trainer)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    # As a caller summing an eval loss over several batches would: this batch's share of a larger token count.
    num_items = torch.tensor(3 * tokens + 7)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    torch.testing.assert_close(
        loss, _float64_loss(trainer, student_logits, teacher_logits, batch, num_items), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        per_token, _float64_loss(trainer, student_logits, teacher_logits, batch, None), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["chunked", "full-logits"])
def test_train_mode_compute_loss_divides_by_this_process_share(
    tiny, tokenizer, dataset, tmp_path, monkeypatch, memory_efficient, num_processes
):
    trainer = make_trainer(tiny, tokenizer, dataset, tmp_path, memory_efficient_loss=memory_efficient)
    _, student_logits, teacher_logits, batch = trainer_loss_and_full_logits(trainer)
    num_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) * 4)  # the whole window's, all processes
    # Gradients are averaged over processes, so each one divides by its share: twice the loss on two processes.
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: num_processes))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    expected = _float64_loss(trainer, student_logits, teacher_logits, batch, num_items / num_processes)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The README's Python quick start on a machine without bf16


def test_python_quick_start_runs_where_bf16_is_unsupported(tmp_path, monkeypatch, caplog):
    from transformers import training_args

    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(training_args, "is_torch_xla_available", lambda: False)
    paths = save_tiny_setup(tmp_path / "tiny", num_examples=8)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    dataset = load_dataset("json", data_files=paths["dataset"], split="train")
    from trl_eopd import config as config_module

    config_module._say_float32_fallback.cache_clear()  # said once per process: earlier tests may have said it
    with caplog.at_level(logging.INFO, logger="trl_eopd.config"):
        # As in the README: no `bf16` argument.
        args = EOPDConfig(
            output_dir=str(tmp_path / "run"),
            max_new_tokens=8,
            max_steps=2,
            per_device_train_batch_size=4,
            report_to=[],
            save_strategy="no",
        )
    assert args.bf16 is False
    assert [r.getMessage() for r in caplog.records if "float32" in r.getMessage()]
    trainer = EOPDTrainer(
        model=student, teacher_model=paths["teacher"], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert next(trainer.model.parameters()).dtype == torch.float32


# With a served teacher (trl_eopd/teacher_server.py), what needs a local teacher is refused before any server is asked;
# the server itself is exercised in tests/vllm_engine/test_teacher_server.py.
SERVED = dict(teacher_model_server_url="http://127.0.0.1:9", reverse_kl_estimator="sampled")


def test_served_teacher_refuses_a_teacher_module_and_compute_metrics(tiny, tokenizer, dataset, tmp_path):
    args = make_args(tmp_path, **SERVED)
    with pytest.raises(ValueError, match=r"`teacher_model` must be None or a name when"):
        EOPDTrainer(model=tiny["student"], teacher_model=AutoModelForCausalLM.from_pretrained(tiny["teacher"]),
                    args=args, train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match=r"`compute_metrics` needs full logits of both models"):
        EOPDTrainer(model=tiny["student"], teacher_model=None, args=args, train_dataset=dataset,
                    processing_class=tokenizer, compute_metrics=lambda prediction: {})  # fmt: skip


def test_served_teacher_that_does_not_answer_names_the_url_and_the_timeout(tiny, tokenizer, dataset, tmp_path):
    from trl_eopd.teacher_server import TeacherServerError

    args = make_args(tmp_path, **SERVED, teacher_model_server_timeout=1.0)
    with pytest.raises(TeacherServerError, match=r"http://127.0.0.1:9 did not answer GET /health within "
                                                 r"`teacher_model_server_timeout=1`"):  # fmt: skip
        EOPDTrainer(model=tiny["student"], teacher_model=None, args=args, train_dataset=dataset,
                    processing_class=tokenizer)  # fmt: skip


def test_served_teacher_gets_its_settings_and_the_loss_the_servers_vocabulary_entropy_and_estimate(
    tiny, tokenizer, dataset, tmp_path, monkeypatch
):
    # A stand-in for the vLLM client: the tiny teacher's top log-probabilities computed here, as a server returns them,
    # and its exact entropy once `exact_entropy` is set, as a server with trl-eopd's plugin returns it.
    from trl_eopd import teacher_server
    from trl_eopd.trainer import _SERVED_TEACHER

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    clients, fetched, entropies = [], [], []

    class LocalTeacherServer:
        exact_entropy = False

        def __init__(self, url, *, top_logprobs, timeout, retries, student_vocab_size, teacher_name=None):
            self.vocab_size, self.top_logprobs = student_vocab_size, top_logprobs
            self.settings = {"url": url, "top_logprobs": top_logprobs, "timeout": timeout, "retries": retries}
            clients.append(self)

        def fetch(self, batches, global_step):
            results = []
            for batch in batches:
                with torch.no_grad():
                    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                log_probs = logits[:, :-1][labels != -100].double().log_softmax(-1)
                top, ids = log_probs.topk(self.top_logprobs, dim=-1)
                target = log_probs.gather(-1, labels[labels != -100][:, None])[:, 0]
                entropy = -(log_probs.exp() * log_probs).sum(-1)
                entropies.append(entropy)
                results.append(teacher_server.ServedTeacherLogProbs(
                    top.float(), ids, target.float(), entropy.float() if self.exact_entropy else None
                ))  # fmt: skip
            fetched.extend(results)
            return results

        def close(self):
            pass

    monkeypatch.setattr(teacher_server, "TeacherServer", LocalTeacherServer)
    args = make_args(tmp_path, **SERVED, teacher_top_logprobs=16, teacher_entropy_estimate="upper",
                     teacher_model_server_timeout=17.0, teacher_model_server_retries=2)  # fmt: skip
    trainer = EOPDTrainer(model=tiny["student"], teacher_model=None, args=args, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    assert clients[0].settings == {"url": SERVED["teacher_model_server_url"], "top_logprobs": 16, "timeout": 17.0,
                                   "retries": 2}  # fmt: skip
    vocab_size = trainer.model.config.get_text_config().vocab_size
    assert clients[0].vocab_size == vocab_size == trainer.model.get_output_embeddings().weight.size(0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch.pop(_SERVED_TEACHER, None)  # fetched again inside the loss: the same values
    trainer.model.train()

    def logged_means():
        with torch.no_grad():
            trainer.compute_loss(trainer.model, dict(batch))
        return trainer._stats_class.from_tensor(trainer._eopd_sums.pop("train").cpu()).means()

    means = logged_means()
    # The logged estimate is the upper bound over the served vocabulary, written out here: H_topK - m log(m / (V - K)).
    top = fetched[-1].top_log_probs.double()
    tail_mass = 1 - top.exp().sum(-1)
    upper = -(top.exp() * top).sum(-1) - tail_mass * (tail_mass / (vocab_size - top.size(-1))).log()
    assert means["eopd/teacher_entropy_estimate"] == pytest.approx(float(upper.mean()), rel=1e-5)
    assert means["eopd/high_entropy_ratio"] == pytest.approx(float((upper.float() > 0.8).double().mean()))
    # A server that gives the exact entropy: the gate and the statistics use it, whatever the estimate says.
    clients[0].exact_entropy = True
    means = logged_means()
    exact = entropies[-1]
    assert means["eopd/teacher_entropy_exact"] == 1.0
    assert means["eopd/teacher_entropy"] == pytest.approx(float(exact.mean()), rel=1e-5)
    assert abs(float(exact.mean()) - float(upper.mean())) > 1e-4 * float(exact.mean())  # so the estimate would show
    assert means["eopd/high_entropy_ratio"] == pytest.approx(float((exact.float() > 0.8).double().mean()))
