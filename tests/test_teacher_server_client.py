"""The teacher-server client's parsing of vLLM's answer, without a server (tests/vllm_engine/ has the real one)."""

from __future__ import annotations

import math

import pytest
import torch

from trl_eopd.teacher_server import TeacherServer, TeacherServerError


def _as_post(fake):
    """A fake of `_post_completion(prompts, prompt_logprobs)` as the client's one HTTP seam, `_post(path, payload)`."""

    def post(path, payload):
        assert path == "/v1/completions", path
        return fake(payload["prompt"], payload.get("prompt_logprobs"))

    return post


def _client(top_logprobs=2, vocab_size=10):
    client = TeacherServer.__new__(TeacherServer)  # no start-up checks: nothing to connect to here
    client.url, client.top_logprobs, client.vocab_size = "http://127.0.0.1:1", top_logprobs, vocab_size
    client.model_name, client.timeout, client.retries = "teacher", 1.0, 0
    return client


def _choice(*positions):
    return {"prompt_logprobs": [None, *positions]}


def test_vllm_zero_probabilities_become_minus_infinity_and_rows_follow_the_completions():
    choice = _choice(
        {"7": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -9999.0, "rank": 2}},  # vLLM's stand-in for log 0
        {"4": {"logprob": -0.2, "rank": 1}, "2": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -7.0, "rank": 9}},
    )
    fetched = _client()._to_tensors([choice], [[5, 7, 9]], [1])
    assert fetched.top_log_probs[0, 1] == -math.inf and torch.isfinite(fetched.top_log_probs[1]).all()
    assert fetched.top_ids.tolist() == [[7, 3], [4, 2]]
    torch.testing.assert_close(fetched.target_log_probs, torch.tensor([-0.1, -7.0]))


def test_a_sampled_token_without_a_finite_log_prob_is_an_error():
    choice = _choice({"7": {"logprob": -9999.0, "rank": 1}, "3": {"logprob": -0.1, "rank": 2}})
    with pytest.raises(TeacherServerError, match=r"no finite log-probability for 1 sampled token"):
        _client()._to_tensors([choice], [[5, 7]], [1])


def test_the_context_check_leaves_room_for_the_generated_token():
    client = _client()
    client.max_model_len = 8
    client.check_context([[1] * 7])
    with pytest.raises(TeacherServerError, match=r"A sequence of 8 tokens .* `max_model_len` is 8"):
        client.check_context([[1] * 8])


# A server with trl-eopd's vLLM plugin (trl_eopd/vllm_plugin/) adds each position's entropy under token id -1, ranked
# after the K real entries.


def _entropy_entry(value, rank):
    return {"-1": {"logprob": value, "rank": rank, "decoded_token": "<trl_eopd:teacher_entropy>"}}


def test_the_plugin_entropy_is_read_per_completion_token_and_never_taken_for_a_token():
    client = _client(top_logprobs=3)
    client.exact_entropy = True
    choice = _choice(
        {"7": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -2.5, "rank": 2}, **_entropy_entry(0.41, 3)},
        {"4": {"logprob": -0.2, "rank": 1}, "9": {"logprob": -7.0, "rank": 5}, **_entropy_entry(1.25, 3)},
    )
    second = _choice({"2": {"logprob": -0.3, "rank": 1}, **_entropy_entry(0.9, 2)})
    fetched = client._to_tensors([choice, second], [[5, 7, 9], [1, 2]], [1, 1])
    torch.testing.assert_close(fetched.entropy, torch.tensor([0.41, 1.25, 0.9]))
    # With 3 fetched per token, the entropy entry (rank 2 or 3) would otherwise fill a top-k slot as token -1.
    assert -1 not in fetched.top_ids.tolist()[0] + fetched.top_ids.tolist()[2]
    assert fetched.top_log_probs[0, 2] == -math.inf
    parts = fetched.split([2, 1])
    torch.testing.assert_close(parts[1].entropy, torch.tensor([0.9]))
    assert parts[0].to("cpu").entropy.tolist() == pytest.approx([0.41, 1.25])


def test_the_entropy_of_a_prompt_position_is_not_read():
    # The plugin adds the entropy at every position, the prompt's own included: only the completion's count.
    client = _client(top_logprobs=2)
    client.exact_entropy = True
    choice = _choice(
        {"5": {"logprob": -0.3, "rank": 1}, **_entropy_entry(2.0, 2)},  # the prompt's last token
        {"7": {"logprob": -0.1, "rank": 1}, **_entropy_entry(0.41, 2)},
        {"9": {"logprob": -0.2, "rank": 1}, **_entropy_entry(1.25, 2)},
    )
    fetched = client._to_tensors([choice], [[3, 5, 7, 9]], [2])
    torch.testing.assert_close(fetched.entropy, torch.tensor([0.41, 1.25]))
    assert fetched.top_ids[:, 0].tolist() == [7, 9]


def test_an_entropy_missing_after_start_up_stops_training_instead_of_falling_back():
    client = _client()
    client.exact_entropy = True
    choice = _choice({"7": {"logprob": -0.1, "rank": 1}, **_entropy_entry(0.4, 3)},
                     {"4": {"logprob": -0.2, "rank": 1}})  # fmt: skip
    with pytest.raises(TeacherServerError, match=r"entropy for 1 of 2 tokens.*restarted without trl-eopd's vLLM"):
        client._to_tensors([choice], [[5, 7, 4]], [1])


def test_without_the_plugin_no_entropy_is_read_even_if_an_entry_comes():
    choice = _choice({"7": {"logprob": -0.1, "rank": 1}, **_entropy_entry(0.4, 2)})
    fetched = _client()._to_tensors([choice], [[5, 7]], [1])
    assert fetched.entropy is None and fetched.top_ids.tolist() == [[7, 0]]


@pytest.mark.parametrize("plugin", [True, False])
def test_the_start_up_probe_finds_the_entropy_and_says_so_once_when_it_is_missing(plugin, caplog):
    import json

    client = _client(top_logprobs=2)
    position = {"0": {"logprob": -0.5, "rank": 1}, "1": {"logprob": -1.0, "rank": 2}}
    if plugin:
        position.update(_entropy_entry(0.7, 3))
    body = json.dumps({"choices": [{"index": 0, "prompt_logprobs": [None, position]}]})
    client._post = _as_post(lambda prompts, prompt_logprobs: (200, body))
    with caplog.at_level("INFO", logger="trl_eopd.teacher_server"):
        assert client._probe_logprobs() is plugin
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    if plugin:
        assert warnings == [] and "the gate is exact" in caplog.text
    else:
        assert len(warnings) == 1
        assert "does not return the teacher's entropy" in warnings[0] and "estimate" in warnings[0]
        assert "python -m trl_eopd.vllm_plugin.serve --model TEACHER" in warnings[0]


def test_fetch_gives_each_batch_its_loss_tokens_in_row_major_order(monkeypatch):
    import json

    # Two right-padded batches of different sizes, prompts of different lengths, sent in one request.
    batches = [
        {"input_ids": [[11, 12, 13, 14], [21, 22, 23, 0]], "attention_mask": [[1, 1, 1, 1], [1, 1, 1, 0]],
         "labels": [[-100, -100, 13, 14], [-100, 22, 23, -100]]},
        {"input_ids": [[31, 32, 33, 34, 35]], "attention_mask": [[1, 1, 1, 1, 1]],
         "labels": [[-100, -100, 33, 34, 35]]},
    ]  # fmt: skip
    batches = [{key: torch.tensor(value) for key, value in batch.items()} for batch in batches]

    def log_prob(token, position):  # a distinct value per token and position
        return -token / 10 - position / 1000

    requests = []

    def post(prompts, prompt_logprobs):
        requests.append(prompts)
        choices = [
            {"index": i, "prompt_logprobs": [None] + [{str(token): {"logprob": log_prob(token, position), "rank": 1}}
                                                      for position, token in enumerate(prompt) if position]}
            for i, prompt in enumerate(prompts)
        ]  # fmt: skip
        return 200, json.dumps({"choices": choices})

    client = _client(top_logprobs=1, vocab_size=100)
    client.max_model_len, client.model_name, client.retries, client.exact_entropy = 64, "teacher", 0, False
    monkeypatch.setattr(client, "_post", _as_post(post))
    fetched = client.fetch(batches, global_step=0)
    assert requests == [[[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]]  # one request, padding trimmed
    assert len(fetched) == len(batches)
    for batch, result in zip(batches, fetched):
        labels = batch["labels"][:, 1:]
        positions = (labels != -100).nonzero()  # row-major, as the loss reads them
        expected = [log_prob(int(labels[row, column]), int(column) + 1) for row, column in positions]
        torch.testing.assert_close(result.target_log_probs, torch.tensor(expected))
        assert result.top_ids[:, 0].tolist() == labels[labels != -100].tolist()


class _FakeVocabularyServer:
    """`_post_completion` of a server whose vocabulary holds `size` ids: vLLM answers 400 beyond it."""

    def __init__(self, size):
        self.size, self.probed = size, []

    def __call__(self, prompts, prompt_logprobs):
        ids = [token for prompt in prompts for token in prompt]
        self.probed += ids
        if max(ids) >= self.size:
            return 400, f'{{"error": "Token id {max(ids)} is out of vocabulary"}}'
        return 200, "{}"


@pytest.mark.parametrize("served_size", [1000, 999, 1001, 512, 4096])
def test_the_vocabulary_probe_accepts_exactly_the_students_size(monkeypatch, served_size):
    client = _client(vocab_size=1000)
    server = _FakeVocabularyServer(served_size)
    monkeypatch.setattr(client, "_post", _as_post(server))
    if served_size == 1000:
        client._check_vocabulary()
        assert server.probed == [999, 1000]  # the student's last id passes, the next one is refused
        return
    with pytest.raises(TeacherServerError, match=rf"has a vocabulary of {served_size} token ids but the student has "
                                                 r"1000\."):  # fmt: skip
        client._check_vocabulary()


def test_a_probe_answered_otherwise_is_an_error(monkeypatch):
    client = _client(vocab_size=1000)
    monkeypatch.setattr(client, "_post", _as_post(lambda prompts, prompt_logprobs: (500, "engine dead")))
    with pytest.raises(TeacherServerError, match=r"answered HTTP 500 to a probe: engine dead"):
        client._check_vocabulary()


class _FlakyServer:
    """`_post_completion` failing `failures` times (HTTP `status`, or no answer), then answering."""

    def __init__(self, failures, status=503):
        self.failures, self.status, self.calls = failures, status, 0

    def __call__(self, prompts, prompt_logprobs):
        self.calls += 1
        if self.calls <= self.failures:
            if self.status is None:
                raise TeacherServerError("no answer") from ConnectionError("refused")
            return self.status, "busy"
        return 200, '{"choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a"}]}'


@pytest.mark.parametrize("retries", [0, 1, 3])
@pytest.mark.parametrize("status", [503, None])
def test_a_failed_request_is_retried_exactly_retries_times(monkeypatch, retries, status):
    pauses = []
    monkeypatch.setattr("trl_eopd.server_http.time.sleep", pauses.append)
    client = _client()
    client.retries = retries
    server = _FlakyServer(failures=retries, status=status)  # the last allowed attempt succeeds
    monkeypatch.setattr(client, "_post", _as_post(server))
    choices = client._completions_with_retries([[1, 2]], global_step=7)
    assert [choice["text"] for choice in choices] == ["a", "b"] and server.calls == retries + 1
    assert pauses == [min(2.0**attempt, 30.0) for attempt in range(retries)]

    server = _FlakyServer(failures=retries + 1, status=status)  # one failure too many
    monkeypatch.setattr(client, "_post", _as_post(server))
    with pytest.raises(TeacherServerError, match=rf"failed at global step 7 after {retries + 1} attempt\(s\) "
                                                 rf"\(`teacher_model_server_retries={retries}`\)"):  # fmt: skip
        client._completions_with_retries([[1, 2]], global_step=7)
    assert server.calls == retries + 1


def test_a_malformed_request_is_not_retried(monkeypatch):
    monkeypatch.setattr("trl_eopd.server_http.time.sleep", lambda seconds: None)
    client = _client()
    client.retries = 3
    server = _FlakyServer(failures=5, status=400)
    monkeypatch.setattr(client, "_post", _as_post(server))
    with pytest.raises(TeacherServerError, match=r"after 1 attempt\(s\)"):
        client._completions_with_retries([[1, 2]], global_step=0)
    assert server.calls == 1
