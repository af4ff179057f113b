"""Several served teachers (MOPD): routing, the routed loss, per-teacher metrics and every error, without a server.

Each vLLM server is simulated at the `requests` level only (`requests.Session.request`): a local tiny teacher answers
`/health`, `/v1/models` and `/v1/completions` with vLLM's JSON (top-K prompt log-probs by rank plus the actual
token's, and with `exact_entropy` the entropy entry of trl-eopd's plugin), so `TeacherServer`'s own start-up checks,
retries and parsing run unchanged. The real servers are in tests/vllm_engine/test_teacher_routing_vllm.py.
"""

from __future__ import annotations

import json
import math

import pytest
import requests
import torch
from datasets import Dataset

from trl_eopd import EOPDConfig, EOPDTrainer
from trl_eopd.loss.importance import ImportanceCorrection
from trl_eopd.loss.served import served_teacher_eopd_loss_and_stats
from trl_eopd.teacher_routing import RoutedTeacherLogProbs, routed_teacher_eopd_loss_and_stats
from trl_eopd.teacher_server import TeacherServer, TeacherServerError
from trl_eopd.tiny import (
    build_servable_tiny_teacher,
    build_tiny_model,
    build_tiny_tokenizer,
    toy_arithmetic_conversations,
)

TOP_K = 8
FETCHED = 16
URLS = {"math": "http://math-teacher:8000", "code": "http://code-teacher:8001"}
# Different thresholds per teacher, each inside its teacher's entropy range, so a row gated at the other teacher's
# threshold (or by the other teacher) would change the loss.
THRESHOLDS = {"math": 0.6, "code": 1.1}


class _LocalVLLM:
    """One vLLM server's answers, computed by a local teacher."""

    def __init__(self, model, name, *, exact_entropy=False, vocab_size=None):
        self.model, self.name, self.exact_entropy = model.eval(), name, exact_entropy
        self.vocab_size = vocab_size or model.config.vocab_size
        self.fail_completions = False
        self.completion_requests = 0

    def answer(self, method, path, payload):
        if path == "/health":
            return 200, ""
        if path == "/v1/models":
            return 200, json.dumps({"data": [{"id": self.name, "root": self.name, "max_model_len": 512}]})
        assert method == "POST" and path == "/v1/completions", (method, path)
        prompts = payload["prompt"]
        if any(token >= self.vocab_size for prompt in prompts for token in prompt):
            return 400, json.dumps({"message": "Token id is out of vocabulary"})
        if payload.get("prompt_logprobs") is None:
            return 200, json.dumps({"choices": [{"index": i, "prompt_logprobs": None} for i in range(len(prompts))]})
        self.completion_requests += 1
        if self.fail_completions:
            return 503, "Service Unavailable"
        k = payload["prompt_logprobs"]
        return 200, json.dumps({"choices": [self._choice(i, prompt, k) for i, prompt in enumerate(prompts)]})

    def _choice(self, index, prompt, k):
        with torch.no_grad():
            log_probs = self.model(input_ids=torch.tensor([prompt])).logits[0].double().log_softmax(-1)
        positions = [None]
        for position in range(1, len(prompt)):
            row = log_probs[position - 1]
            order = row.argsort(descending=True).tolist()
            entries = {str(t): {"logprob": float(row[t]), "rank": rank + 1} for rank, t in enumerate(order[:k])}
            actual = prompt[position]
            entries.setdefault(str(actual), {"logprob": float(row[actual]), "rank": order.index(actual) + 1})
            if self.exact_entropy:
                entries["-1"] = {"logprob": float(-(row.exp() * row).sum()), "rank": k + 1}
            positions.append(entries)
        return {"index": index, "prompt_logprobs": positions}


@pytest.fixture
def servers(monkeypatch, tiny):
    by_host = {
        "math-teacher:8000": _LocalVLLM(tiny["math"], "math-teacher", exact_entropy=True),
        "code-teacher:8001": _LocalVLLM(tiny["code"], "code-teacher"),
    }

    def request(session, method, url, timeout=None, json=None, **kwargs):
        host, _, path = url.split("://", 1)[1].partition("/")
        if host not in by_host:
            raise requests.ConnectionError(f"no server at {host}")
        status, body = by_host[host].answer(method, "/" + path, json)
        response = requests.Response()
        response.status_code, response._content, response.url = status, body.encode(), url
        return response

    monkeypatch.setattr(requests.Session, "request", request)
    return {"math": by_host["math-teacher:8000"], "code": by_host["code-teacher:8001"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    tokenizer = build_tiny_tokenizer()
    math_teacher = build_servable_tiny_teacher(tokenizer, seed=11)
    code_teacher = build_servable_tiny_teacher(tokenizer, seed=23)
    student = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32, seed=5)  # fmt: skip
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    rows = toy_arithmetic_conversations(8, seed=4)
    for i, row in enumerate(rows):
        row["teacher_id"] = "math" if i % 3 != 1 else "code"
    return {"tokenizer": tokenizer, "math": math_teacher, "code": code_teacher, "student": str(root / "student"),
            "rows": rows, "root": root}  # fmt: skip


def _config(tiny, name, **overrides):
    args = {
        "output_dir": str(tiny["root"] / name), "bf16": False, "report_to": [], "max_new_tokens": 6,
        "reverse_kl_estimator": "sampled", "forward_kl_top_k": TOP_K, "teacher_top_logprobs": FETCHED,
        "teacher_model_server_url": dict(URLS), "teacher_entropy_thresholds": {"code": THRESHOLDS["code"]},
        "entropy_threshold": THRESHOLDS["math"], "teacher_model_server_timeout": 5, "teacher_model_server_retries": 0,
        "per_device_train_batch_size": 4, "max_steps": 1, "logging_steps": 1, **overrides,
    }  # fmt: skip
    return EOPDConfig(**args)


def _trainer(tiny, name="routed", rows=None, **overrides):
    return EOPDTrainer(
        model=tiny["student"],
        args=_config(tiny, name, **overrides),
        train_dataset=Dataset.from_list(rows if rows is not None else tiny["rows"]),
        processing_class=tiny["tokenizer"],
    )


def _single_teacher(url):
    return TeacherServer(url, top_logprobs=FETCHED, timeout=5, retries=0, student_vocab_size=320)


def test_the_routed_loss_and_gradients_equal_each_rows_single_teacher_loss(servers, tiny):
    trainer = _trainer(tiny)
    batch = trainer.data_collator(tiny["rows"][:6])
    assert batch["teacher_id"] == [row["teacher_id"] for row in tiny["rows"][:6]]
    before = {t: server.completion_requests for t, server in servers.items()}  # the start-up probes
    (routed,) = trainer._teacher_server.fetch([batch], global_step=0)
    assert all(server.completion_requests == before[t] + 1 for t, server in servers.items())  # one request each
    loss_mask = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][loss_mask]
    student = trainer.model
    weight = student.lm_head.weight.detach().clone().requires_grad_()
    with torch.no_grad():
        hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state[:, :-1][loss_mask]
    hidden.requires_grad_()
    divisor = int(loss_mask.sum()) + 3  # a window's count: more tokens than this batch's
    options = trainer.loss_options
    # Stale rollouts (server mode, max_staleness >= 1): each token's sampler log-prob, split with its teacher's group.
    generator = torch.Generator().manual_seed(0)
    sampler = -3 * torch.rand(len(targets), generator=generator)
    sampler[::5] = float("nan")  # unknown: weight 1
    importance = ImportanceCorrection(sampler, 2.0)
    loss, stats = routed_teacher_eopd_loss_and_stats(
        hidden, weight, targets, routed, teacher_ids=["math", "code"], options=options,
        entropy_thresholds=trainer._teacher_server.entropy_thresholds, num_items_in_batch=divisor, vocab_size=320,
        importance=importance,
    )  # fmt: skip
    loss.backward()

    # Reference: every row alone, fetched by a single-teacher client of its own teacher, with that teacher's
    # threshold; the per-row losses over the same divisor add up to the batch's.
    ref_hidden, ref_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    counts = loss_mask.sum(1).tolist()
    starts = [sum(counts[:r]) for r in range(len(counts))]
    reference, gated = 0.0, {"math": 0.0, "code": 0.0}
    clients = {teacher_id: _single_teacher(url) for teacher_id, url in URLS.items()}
    for row, teacher_id in enumerate(batch["teacher_id"]):
        rows = slice(starts[row], starts[row] + counts[row])
        one = {key: batch[key][row : row + 1] for key in ("input_ids", "attention_mask", "labels")}
        (served,) = clients[teacher_id].fetch([one], global_step=0)
        row_loss, row_stats = served_teacher_eopd_loss_and_stats(
            ref_hidden[rows], ref_weight, targets[rows], served.top_log_probs, served.top_ids,
            served.target_log_probs, teacher_entropy=served.entropy, vocab_size=320,
            options=options.replace(entropy_threshold=THRESHOLDS[teacher_id]), num_items_in_batch=divisor,
            importance=ImportanceCorrection(sampler[rows], 2.0),
        )  # fmt: skip
        reference = reference + row_loss.double()
        gated[teacher_id] += float(row_stats.num_high_entropy)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_weight.grad, rtol=1e-5, atol=1e-7)
    for teacher_id in URLS:
        assert float(stats.per_teacher[teacher_id].num_high_entropy) == gated[teacher_id]
    assert all(gated.values()), gated  # both teachers gate some tokens, so a swapped threshold would show
    # The exact-entropy teacher's gate against float64 entropies of the local model, per token.
    math_rows = [r for r, t in enumerate(batch["teacher_id"]) if t == "math"]
    with torch.no_grad():
        log_probs = tiny["math"](input_ids=batch["input_ids"][math_rows], attention_mask=batch["attention_mask"][
            math_rows]).logits.double().log_softmax(-1)[:, :-1][loss_mask[math_rows]]  # fmt: skip
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    assert float(stats.per_teacher["math"].num_high_entropy) == int((entropy > THRESHOLDS["math"]).sum())


def test_training_logs_per_teacher_metrics_that_add_up(servers, tiny):
    trainer = _trainer(tiny, "train")
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    assert log["eopd/teacher/math/token_share"] + log["eopd/teacher/code/token_share"] == pytest.approx(1.0)
    for name in ("high_entropy_ratio", "loss_base", "loss_forward_gated", "gate_ambiguous_ratio"):
        shares = [log[f"eopd/teacher/{t}/token_share"] for t in ("math", "code")]
        parts = [log[f"eopd/teacher/{t}/{name}"] for t in ("math", "code")]
        assert sum(s * p for s, p in zip(shares, parts)) == pytest.approx(log[f"eopd/{name}"], rel=1e-5, abs=1e-9)
    # The math server returns the exact entropy, the code server does not: each teacher's entropy is named so.
    assert "eopd/teacher/math/teacher_entropy" in log and "eopd/teacher/code/teacher_entropy_estimate" in log
    assert log["eopd/teacher/math/gate_ambiguous_ratio"] == 0.0
    assert log["loss"] == pytest.approx(log["eopd/loss_base"] + log["eopd/loss_forward_gated"], rel=1e-5)


def test_a_single_url_needs_no_column_and_a_single_teacher_mapping_neither(servers, tiny):
    rows = [{"messages": row["messages"]} for row in tiny["rows"]]
    _trainer(tiny, "single", rows=rows, teacher_model_server_url=URLS["math"], teacher_entropy_thresholds=None)
    trainer = _trainer(tiny, "one", rows=rows, teacher_model_server_url={"math": URLS["math"]},
                       teacher_entropy_thresholds=None)  # fmt: skip
    (routed,) = trainer._teacher_server.fetch([trainer.data_collator(rows[:2])], global_step=0)
    assert list(routed.groups) == ["math"]


def test_dataset_errors_name_the_row_and_the_known_ids_before_any_server_is_asked(servers, tiny):
    # Servers that do not exist: the data is checked first, so the error comes at once, not after their timeout.
    nowhere = {"teacher_model_server_url": {"math": "http://nowhere:1", "code": "http://nowhere:2"},
               "teacher_model_server_timeout": 60}  # fmt: skip
    rows = [dict(row) for row in tiny["rows"]]
    rows[5]["teacher_id"] = "physics"
    with pytest.raises(ValueError, match=r"Row 5 of `train_dataset` has `teacher_id='physics'`.*\['math', 'code'\]"):
        _trainer(tiny, rows=rows, **nowhere)
    without = [{"messages": row["messages"]} for row in tiny["rows"]]
    with pytest.raises(ValueError, match=r"`train_dataset` .* has no `teacher_id` column.*2 teachers"):
        _trainer(tiny, rows=without, **nowhere)


def test_start_up_errors_name_the_teacher_and_its_url(servers, tiny):
    with pytest.raises(TeacherServerError, match=r"Teacher 'code' .* http://nowhere:9 did not answer GET /health"):
        _trainer(tiny, teacher_model_server_url={"math": URLS["math"], "code": "http://nowhere:9"},
                 teacher_model_server_timeout=0.5)  # fmt: skip
    servers["code"].vocab_size = 300
    with pytest.raises(TeacherServerError, match=r"Teacher 'code' .*code-teacher:8001 has a vocabulary of 300 .* 320"):
        _trainer(tiny)


def test_a_teacher_failing_mid_run_names_its_url_and_the_step(servers, tiny):
    trainer = _trainer(tiny, "fails")
    servers["code"].fail_completions = True
    with pytest.raises(TeacherServerError, match=r"code-teacher:8001 failed at global step 0 after 1 attempt"):
        trainer.train()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_model_server_url": "{not json"}, r"`teacher_model_server_url` is not a valid JSON object"),
        ({"teacher_model_server_url": {}}, r"empty mapping"),
        ({"teacher_model_server_url": {"math": "ftp://x"}}, r"`teacher_model_server_url\['math'\]` must be an http"),
        ({"teacher_entropy_thresholds": {"bio": 1.0}}, r"names teacher 'bio'.*\['code', 'math'\]"),
        ({"teacher_entropy_thresholds": {"code": -1}}, r"`teacher_entropy_thresholds\['code'\]` must be a number"),
        ({"teacher_model_server_url": "http://a:1"}, r"`teacher_entropy_thresholds` needs .* a mapping"),
    ],
)
def test_bad_options_name_the_field(tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tiny, "bad", **overrides)


def test_the_command_line_spells_mappings_as_json(tiny):
    config = _config(tiny, "json", teacher_model_server_url=json.dumps(URLS),
                     teacher_entropy_thresholds='{"code": "inf"}')  # fmt: skip
    assert config.teacher_model_server_url == URLS and config.teacher_entropy_thresholds == {"code": math.inf}


def test_an_empty_group_keeps_the_graph_and_counts_nothing(tiny):
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(20, 4, requires_grad=True)
    from trl_eopd.teacher_server import ServedTeacherLogProbs

    empty = ServedTeacherLogProbs(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long), torch.zeros(0))
    routed = RoutedTeacherLogProbs({"math": (torch.zeros(0, dtype=torch.long), empty)})
    options = _config(tiny, "empty").loss_options.replace(forward_kl_top_k=4)
    loss, stats = routed_teacher_eopd_loss_and_stats(hidden, weight, torch.zeros(0, dtype=torch.long), routed,
                                                     teacher_ids=["math", "code"], options=options)  # fmt: skip
    loss.backward()
    assert float(loss) == 0.0 and float(stats.per_teacher["code"].num_tokens) == 0


def test_batches_are_checked_when_fetched_too(servers, tiny):
    trainer = _trainer(tiny, "fetch-checks")
    batch = trainer.data_collator(tiny["rows"][:2])
    batch["teacher_id"] = ["math", "bio"]
    with pytest.raises(ValueError, match=r"global step 3 has `teacher_id='bio'`.*known ids are \['math', 'code'\]"):
        trainer._teacher_server.fetch([batch], global_step=3)
    del batch["teacher_id"]
    with pytest.raises(ValueError, match=r"A training batch has no `teacher_id` column"):
        trainer._teacher_server.fetch([batch], global_step=3)


def test_evaluation_reports_each_teachers_forward_kl_and_no_sampled_terms(servers, tiny):
    trainer = _trainer(tiny, "eval", per_device_eval_batch_size=3)
    metrics = trainer.evaluate(Dataset.from_list(tiny["rows"]))
    shares = {t: metrics[f"eval_eopd/teacher/{t}/token_share"] for t in URLS}
    per_teacher = sum(shares[t] * metrics[f"eval_eopd/teacher/{t}/forward_kl_top_k"] for t in URLS)
    assert metrics["eval_loss"] == pytest.approx(per_teacher, rel=1e-5)
    assert not [name for name in metrics if name.endswith(("/loss_base", "/loss_forward_gated", "reverse_kl_sampled"))]
