"""Two real, unpatched vLLM CPU servers serving two different tiny teachers, one student (MOPD routing).

One server per teacher for the whole module. Checked: the routed log-probabilities are each teacher's own (against
the teacher run locally, in float64), the routed loss and gradients equal the sum of the single-teacher losses of
each teacher's rows, and `trl-eopd train` routes a dataset's `teacher_id` column to both servers, logging each
teacher's metrics. Routing errors without a server are in tests/test_teacher_routing.py.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from served_teacher import TeacherServerProcess, free_port
from test_teacher_server import _env, _run

from trl_eopd.collator import PromptKeepingChatMLCollator
from trl_eopd.loss import EOPDLossOptions
from trl_eopd.loss.served import served_teacher_eopd_loss_and_stats
from trl_eopd.teacher_routing import TeacherRouter, routed_teacher_eopd_loss_and_stats
from trl_eopd.teacher_server import TeacherServer
from trl_eopd.tiny import build_servable_tiny_teacher, build_tiny_tokenizer, toy_arithmetic_conversations

pytestmark = pytest.mark.slow

TEACHER_SEEDS = {"math": 11, "code": 23}
THRESHOLDS = {"math": 0.6, "code": 1.1}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed-teachers")
    tokenizer = build_tiny_tokenizer()
    servers, models = {}, {}
    for teacher_id, seed in TEACHER_SEEDS.items():
        models[teacher_id] = build_servable_tiny_teacher(tokenizer, seed=seed).eval()
        models[teacher_id].save_pretrained(root / teacher_id)
        tokenizer.save_pretrained(root / teacher_id)
        servers[teacher_id] = TeacherServerProcess(str(root / teacher_id), max_model_len=256,
                                                   log_dir=root / f"{teacher_id}-logs")  # fmt: skip
    try:
        for server in servers.values():
            server.start()
        yield {"servers": servers, "models": models, "tokenizer": tokenizer, "root": root}
    finally:
        for server in servers.values():
            server.stop()


def test_routed_loss_equals_each_teachers_own_loss(teachers):
    tokenizer, servers = teachers["tokenizer"], teachers["servers"]
    rows = toy_arithmetic_conversations(6, seed=5)
    for i, row in enumerate(rows):
        row["teacher_id"] = "code" if i % 2 else "math"
    batch = PromptKeepingChatMLCollator(tokenizer=tokenizer, max_length=None)(rows)
    options = {"top_logprobs": 32, "timeout": 60.0, "retries": 1, "student_vocab_size": len(tokenizer)}
    router = TeacherRouter({t: s.url for t, s in servers.items()}, entropy_thresholds={"code": 1.1}, **options)
    (routed,) = router.fetch([batch], global_step=0)

    loss_mask = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][loss_mask]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(targets.numel(), 16, generator=generator, requires_grad=True)
    weight = torch.randn(len(tokenizer), 16, generator=generator, requires_grad=True)
    loss_options = EOPDLossOptions(reverse_kl_estimator="sampled", entropy_threshold=THRESHOLDS["math"])
    loss, stats = routed_teacher_eopd_loss_and_stats(
        hidden, weight, targets, routed, teacher_ids=router.teacher_ids, options=loss_options,
        entropy_thresholds=router.entropy_thresholds, num_items_in_batch=targets.numel(),
    )  # fmt: skip
    loss.backward()

    ref_hidden, ref_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = 0.0
    for teacher_id, server in servers.items():
        picked = [r for r, row in enumerate(rows) if row["teacher_id"] == teacher_id]
        sub = {key: batch[key][picked] for key in ("input_ids", "attention_mask", "labels")}
        (served,) = TeacherServer(server.url, **options).fetch([sub], global_step=0)
        index = torch.cat([torch.arange(int(loss_mask[:r].sum()), int(loss_mask[: r + 1].sum())) for r in picked])
        part, part_stats = served_teacher_eopd_loss_and_stats(
            ref_hidden[index], ref_weight, targets[index], served.top_log_probs, served.top_ids,
            served.target_log_probs, options=loss_options.replace(entropy_threshold=THRESHOLDS[teacher_id]),
            num_items_in_batch=targets.numel(),
        )  # fmt: skip
        reference = reference + part
        assert float(stats.per_teacher[teacher_id].num_high_entropy) == float(part_stats.num_high_entropy)
        # The log-probs routed to this teacher are its own: its local twin's in float64, far from the other's.
        routed_target = routed.groups[teacher_id][1].target_log_probs.double()
        for model_id, model in teachers["models"].items():
            with torch.no_grad():
                logits = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
            local = logits.double().log_softmax(-1)[:, :-1][loss_mask[picked]]
            local_target = local.gather(-1, targets[index].unsqueeze(-1)).squeeze(-1)
            if model_id == teacher_id:
                torch.testing.assert_close(routed_target, local_target, rtol=1e-4, atol=1e-4)
            else:
                assert (routed_target - local_target).abs().max() > 0.1
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_weight.grad, rtol=1e-5, atol=1e-7)
    router.close()


def test_train_cli_routes_each_row_to_its_teacher(teachers, tiny_assets, tmp_path):
    root, _ = tiny_assets
    data = tmp_path / "routed.jsonl"
    with open(data, "w") as handle:
        handle.writelines(
            json.dumps({**row, "teacher_id": "code" if i % 2 else "math"}) + "\n"
            for i, row in enumerate(toy_arithmetic_conversations(16, seed=6))
        )
    urls = json.dumps({t: s.url for t, s in teachers["servers"].items()})
    # Two processes (torchrun with `use_cpu`, gloo): each sends one request per teacher for its own rows.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "trl_eopd.cli", "train", "--config", "tiny-cpu", "--dataset_name", str(data), "--use_cpu", "true",
        "--teacher_model_server_url", urls, "--teacher_entropy_thresholds", json.dumps({"code": 1.1}),
        "--teacher_model_server_timeout", "30", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
    ]  # fmt: skip
    code, log = _run(command, _env(TRL_EOPD_TINY_DIR=str(root)), timeout=400)
    assert code == 0, log[-6000:]
    assert "2 process(es)" in log
    for teacher_id in TEACHER_SEEDS:
        assert f"eopd/teacher/{teacher_id}/high_entropy_ratio" in log, log[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
