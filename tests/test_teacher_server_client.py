"""The teacher-server client's parsing of vLLM's answer, without a server (tests/vllm_engine/ has the real one)."""

from __future__ import annotations

import math

import pytest
import torch

from trl_eopd.teacher_server import TeacherServer, TeacherServerError


def _client(top_logprobs=2, vocab_size=10):
    client = TeacherServer.__new__(TeacherServer)  # no start-up checks: nothing to connect to here
    client.url, client.top_logprobs, client.vocab_size = "http://127.0.0.1:1", top_logprobs, vocab_size
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
    client._post_completion = lambda prompts, prompt_logprobs: (200, body)
    with caplog.at_level("INFO", logger="trl_eopd.teacher_server"):
        assert client._probe_logprobs() is plugin
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    if plugin:
        assert warnings == [] and "the gate is exact" in caplog.text
    else:
        assert len(warnings) == 1
        assert "does not return the teacher's entropy" in warnings[0] and "estimate" in warnings[0]
        assert "python -m trl_eopd.vllm_plugin.serve --model TEACHER" in warnings[0]
