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
