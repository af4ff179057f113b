"""A teacher served by an unpatched vLLM server: option checks, start-up checks and fetching its log-probabilities.

The server is any OpenAI-compatible vLLM server (`vllm serve TEACHER --max-logprobs -1 --logprobs-mode
processed_logprobs`). For every completion token it returns, through `/v1/completions` with `prompt_logprobs`, the
teacher's top log-probabilities with their token ids and the log-probability of the actual token, whatever its rank.
That is all the paper's recipe (arXiv 2603.07079) needs exactly, except the teacher's entropy. A server started with
trl-eopd's vLLM plugin (`python -m trl_eopd.vllm_plugin.serve`, see `trl_eopd/vllm_plugin/`) also returns each
position's exact entropy; the start-up probe finds out whether it does, and otherwise the gate estimates the entropy
(`trl_eopd/loss/served.py`), saying so once.

Why not TRL's `VLLMClient.get_sequence_logprobs`: its module needs vLLM installed in the trainer's process only to be
constructed (it speaks plain HTTP), its session retries with a backoff that no request timeout bounds, and its
results need the fixes below anyway. This module posts the same request with `requests` and reuses TRL's helpers for
the parts that fit: `build_teacher_request_inputs` (padded batch -> trimmed sequences) and the per-choice formatting of
`VLLMClient`, which import without vLLM.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from . import _compat
from .loss.served import ENTROPY_ESTIMATES
from .server_http import VLLMServerConnection
from .vllm_plugin import ENTROPY_TOKEN_ID

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# On the teachers of `scripts/teacher_gate_agreement.py`, 32 halved the estimated gate's disagreements with the exact
# one against 16; 64 gained less for twice the response (docs/teacher_server.md).
DEFAULT_TEACHER_TOP_LOGPROBS = 32
# vLLM writes this instead of -inf for a probability that underflows to zero (JSON has no infinity).
_VLLM_ZERO_PROBABILITY_LOGPROB = -9999.0
_SERVER_FLAGS = "--max-logprobs -1 --logprobs-mode processed_logprobs"
_PLUGIN_SERVER = f"python -m trl_eopd.vllm_plugin.serve --model TEACHER {_SERVER_FLAGS}"
# The key of the plugin's entropy entry in a position's prompt log-probs (JSON object keys are strings).
_ENTROPY_KEY = str(ENTROPY_TOKEN_ID)


class TeacherServerError(RuntimeError):
    """The teacher server cannot be used: unreachable, misconfigured, or failing mid-run."""


def validate_teacher_server_options(args) -> None:
    """Raise a `ValueError` naming the field for an `EOPDConfig` that a served teacher cannot train exactly."""
    url = args.teacher_model_server_url
    top_logprobs = args.teacher_top_logprobs
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, Integral) or top_logprobs < 1:
        raise ValueError(f"`teacher_top_logprobs` must be an integer >= 1; got {top_logprobs!r}.")
    timeout = args.teacher_model_server_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, Real) or not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"`teacher_model_server_timeout` must be a finite number of seconds > 0; got {timeout!r}.")
    estimate = args.teacher_entropy_estimate
    if estimate not in ENTROPY_ESTIMATES:
        raise ValueError(
            f"`teacher_entropy_estimate` must be one of {', '.join(ENTROPY_ESTIMATES)}; got {estimate!r}."
        )
    retries = args.teacher_model_server_retries
    if isinstance(retries, bool) or not isinstance(retries, Integral) or retries < 0:
        raise ValueError(f"`teacher_model_server_retries` must be an integer >= 0; got {retries!r}.")
    if url is None:
        return
    # A mapping of teacher id to URL was checked entry by entry (`trl_eopd/teacher_routing.py`).
    if not isinstance(url, dict) and (not isinstance(url, str) or not url.strip().startswith(("http://", "https://"))):
        raise ValueError(
            f"`teacher_model_server_url` must be an http(s) base URL such as 'http://10.0.0.3:8000'; got {url!r}."
        )
    why_full = "which a server does not return: it only returns the teacher's top log-probabilities"
    if 0.0 < args.beta < 1.0:
        raise ValueError(
            f"`beta={args.beta}` (a generalized JSD) needs the teacher's full distribution, {why_full}. With "
            "`teacher_model_server_url`, set `beta=1.0` and `reverse_kl_estimator='sampled'`."
        )
    if args.reverse_kl_estimator != "sampled":
        raise ValueError(
            f"`reverse_kl_estimator={args.reverse_kl_estimator!r}` needs the teacher's full distribution, {why_full}. "
            "With `teacher_model_server_url`, set `reverse_kl_estimator='sampled'` (the paper's estimate, exact from "
            "the served log-probability of the sampled token)."
        )
    if args.forward_kl_top_k is None:
        raise ValueError(
            f"`forward_kl_top_k=None` (the full-vocabulary forward KL) needs the teacher's full distribution, "
            f"{why_full}. With `teacher_model_server_url`, set an integer such as 16 (the paper's)."
        )
    if top_logprobs < args.forward_kl_top_k:
        raise ValueError(
            f"`teacher_top_logprobs={top_logprobs}` is below `forward_kl_top_k={args.forward_kl_top_k}`: the forward "
            "KL is taken over the teacher's top-k tokens, so at least that many must be fetched."
        )
    if args.temperature != 1.0:
        raise ValueError(
            f"`temperature={args.temperature}` cannot be applied to a served teacher: vLLM ignores the temperature "
            "for prompt log-probabilities, so the tempered sampled-token log-probability and entropy are out of "
            "reach. With `teacher_model_server_url`, use `temperature=1.0`."
        )
    if not args.memory_efficient_loss:
        raise ValueError(
            "`memory_efficient_loss=False` is not available with `teacher_model_server_url`: the served-teacher loss "
            "is only computed from the student's hidden states. Set `memory_efficient_loss=True`."
        )


@dataclass
class ServedTeacherLogProbs:
    """The teacher's log-probabilities at `N` completion tokens, in the order of the loss positions.

    `top_log_probs` `(N, K)` is sorted by rank (padded with -inf), `top_ids` `(N, K)` holds their token ids, and
    `target_log_probs` `(N,)` the log-probability of the token actually in the sequence. `entropy` `(N,)` is the
    teacher's exact entropy in nats where the server's plugin returns it, else None.
    """

    top_log_probs: torch.Tensor
    top_ids: torch.Tensor
    target_log_probs: torch.Tensor
    entropy: torch.Tensor | None = None

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        tensors = (self.top_log_probs, self.top_ids, self.target_log_probs)
        return tensors if self.entropy is None else (*tensors, self.entropy)

    def split(self, sizes: list[int]) -> list[ServedTeacherLogProbs]:
        parts = zip(*(t.split(sizes) for t in self._tensors()), strict=True)
        return [ServedTeacherLogProbs(*part) for part in parts]

    def to(self, device) -> ServedTeacherLogProbs:
        return ServedTeacherLogProbs(*(t.to(device) for t in self._tensors()))


class TeacherServer(VLLMServerConnection):
    """A vLLM server hosting the teacher, checked at construction.

    `exact_entropy` says whether the server returns the teacher's exact entropy (its vLLM plugin is active); found by
    the start-up probe, and logged as a warning when it does not.

    Args:
        url (`str`):
            The server's base URL.
        top_logprobs (`int`):
            Log-probabilities fetched per token; clamped to the vocabulary.
        timeout (`float`):
            Seconds to wait for the server to come up, and for each request.
        retries (`int`):
            Retries of a failed request before [`TeacherServerError`].
        student_vocab_size (`int`):
            Rows of the student's output layer; the served vocabulary must match it.
        teacher_name (`str`, *optional*):
            If given, a warning is issued when the server hosts a model of another name.
    """

    exact_entropy: bool = False
    error_class = TeacherServerError
    role = "teacher server"
    timeout_field = "teacher_model_server_timeout"
    retries_field = "teacher_model_server_retries"
    start_hint = f"Start it with `vllm serve TEACHER {_SERVER_FLAGS}`, or fix `teacher_model_server_url`"

    def __init__(
        self,
        url: str,
        *,
        top_logprobs: int,
        timeout: float,
        retries: int,
        student_vocab_size: int,
        teacher_name: str | None = None,
    ):
        super().__init__(url, timeout=timeout, retries=retries)
        self.vocab_size = int(student_vocab_size)
        self.top_logprobs = min(int(top_logprobs), self.vocab_size)
        self._wait_until_healthy()
        self.model_name, self.max_model_len = self._served_model(teacher_name)
        self._check_vocabulary()
        self.exact_entropy = self._probe_logprobs()

    # ------------------------------------------------------------------------------------------------ start-up checks

    def _served_model(self, teacher_name: str | None) -> tuple[str, int]:
        models = self._served_models()
        if len(models) != 1:
            raise TeacherServerError(
                f"The teacher server at {self.url} serves {len(models)} models; it must serve exactly the teacher."
            )
        model = models[0]
        if teacher_name is not None and teacher_name not in (model.get("id"), model.get("root")):
            warnings.warn(
                f"EOPDTrainer: `teacher_model={teacher_name!r}`, but the server at {self.url} serves "
                f"{model.get('id')!r}. The served model is the teacher; `teacher_model` is only used for this check.",
                stacklevel=3,
            )
        return model["id"], int(model["max_model_len"])

    def _check_vocabulary(self) -> None:
        served = self._served_vocab_size(self.vocab_size)
        if served == self.vocab_size:
            return
        raise TeacherServerError(
            f"The teacher served at {self.url} has a vocabulary of {served} token ids but the student has "
            f"{self.vocab_size}. EOPD compares the two distributions id by id, so both need the same vocabulary."
        )

    def _probe_logprobs(self) -> bool:
        """Check that the server allows `top_logprobs` prompt log-probs; return whether it gives the entropy too."""
        import json

        status, body = self._post_completion([[0, 0]], prompt_logprobs=self.top_logprobs)
        if status != 200 and status != 400:
            raise TeacherServerError(
                f"The teacher server at {self.url} answered HTTP {status} to a probe: {body[:300]}"
            )
        if status == 400:
            raise TeacherServerError(
                f"The teacher server at {self.url} refused {self.top_logprobs} prompt log-probabilities per token "
                f"(`teacher_top_logprobs`): {body[:300]}. Restart it with `{_SERVER_FLAGS}`, or lower "
                "`teacher_top_logprobs`."
            )
        (choice,) = json.loads(body)["choices"]
        positions = choice.get("prompt_logprobs") or [None, None]
        if _ENTROPY_KEY in (positions[-1] or {}):
            logger.info(f"The teacher server at {self.url} returns the teacher's exact entropy: the gate is exact.")
            return True
        logger.warning(
            f"The teacher server at {self.url} does not return the teacher's entropy (trl-eopd's vLLM plugin is not "
            f"active there), so the gate uses an estimate from the top-{self.top_logprobs} log-probabilities "
            f"(`eopd/teacher_entropy_estimate`). For an exact gate, start the server with `{_PLUGIN_SERVER}`; its "
            "log says why when the plugin is loaded but does not patch (docs/teacher_server.md)."
        )
        return False

    # --------------------------------------------------------------------------------------------------- requests

    def _completion_payload(self, prompts: list[list[int]], prompt_logprobs: int | None) -> dict:
        # One generated token is the least a completion request may ask for; the prompt's log-probs are the answer.
        payload = {"model": self.model_name, "prompt": prompts, "max_tokens": 1, "temperature": 1.0}
        if prompt_logprobs is not None:
            payload["prompt_logprobs"] = prompt_logprobs
        return payload

    def _post_completion(self, prompts: list[list[int]], prompt_logprobs: int | None) -> tuple[int, str]:
        return self._post("/v1/completions", self._completion_payload(prompts, prompt_logprobs))

    def check_context(self, sequences: list[list[int]]) -> None:
        """Every sequence must leave room for the one token a completion request generates."""
        longest = max((len(sequence) for sequence in sequences), default=0)
        if longest + 1 > self.max_model_len:
            raise TeacherServerError(
                f"A sequence of {longest} tokens (prompt plus completion) does not fit the teacher server's context: "
                f"its `max_model_len` is {self.max_model_len}, and a request needs one token more than the sequence. "
                f"Restart the server at {self.url} with `--max-model-len {longest + 1}` or more, or lower "
                "`max_length` / `max_new_tokens`."
            )

    def fetch(self, batches: list[dict], global_step: int) -> list[ServedTeacherLogProbs]:
        """The teacher's log-probabilities for every loss token of `batches`, in one request, one result per batch.

        Each batch holds padded `input_ids`, `attention_mask` and `labels` (-100 outside the completions); the result's
        rows follow the loss positions `labels[:, 1:] != -100` in row-major order, as the loss reads them.
        """
        _compat.trl_vllm_version_check_quiet()  # the module loads `trl.generation`
        from trl.experimental.server_distillation.server_distillation_trainer import build_teacher_request_inputs

        sequences, prompt_lengths, rows_per_batch = [], [], []
        for batch in batches:
            batch_sequences, batch_prompt_lengths, completion_lengths = build_teacher_request_inputs(
                batch["input_ids"], batch["attention_mask"], labels=batch["labels"]
            )
            loss_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            if loss_tokens != completion_lengths:
                raise ValueError(
                    "The completion tokens of a batch are not the last attended tokens of their rows (labels "
                    f"{loss_tokens} vs {completion_lengths} tokens per row), so the teacher server cannot score them."
                )
            sequences += batch_sequences
            prompt_lengths += batch_prompt_lengths
            rows_per_batch.append(sum(completion_lengths))
        if not sequences:
            return []
        self.check_context(sequences)
        choices = self._completions_with_retries(sequences, global_step)
        fetched = self._to_tensors(choices, sequences, prompt_lengths)
        return fetched.split(rows_per_batch)

    def _completions_with_retries(self, sequences: list[list[int]], global_step: int) -> list[dict]:
        payload = self._completion_payload(sequences, self.top_logprobs)
        answer = self._post_with_retries("/v1/completions", payload, global_step)
        return sorted(answer["choices"], key=lambda choice: choice["index"])

    def _entropies(self, choice: dict, prompt_length: int) -> list[float]:
        """Take the plugin's entropy entries out of a choice's completion positions (they are no tokens)."""
        entropies = []
        for position_logprobs in choice["prompt_logprobs"][prompt_length:]:
            entry = (position_logprobs or {}).pop(_ENTROPY_KEY, None)
            if entry is not None:
                entropies.append(entry["logprob"])
        return entropies

    def _to_tensors(self, choices: list[dict], sequences, prompt_lengths) -> ServedTeacherLogProbs:
        top_log_probs, top_ids, target_log_probs, entropies = [], [], [], []
        for choice, sequence, prompt_length in zip(choices, sequences, prompt_lengths, strict=True):
            entropies += self._entropies(choice, prompt_length)
            formatted = _compat.format_sequence_logprobs(choice, sequence, prompt_length, self.top_logprobs)
            top_log_probs += formatted["logprobs"]
            top_ids += formatted["logprob_token_ids"]
            target_log_probs += [value for (value,) in formatted["actual_logprobs"]]
        top = torch.tensor(top_log_probs, dtype=torch.float32).reshape(-1, self.top_logprobs)
        target = torch.tensor(target_log_probs, dtype=torch.float32)
        for values in (top, target):
            values.masked_fill_(values <= _VLLM_ZERO_PROBABILITY_LOGPROB, -math.inf)
        if not torch.isfinite(target).all():
            missing = int((~torch.isfinite(target)).sum())
            raise TeacherServerError(
                f"The teacher server at {self.url} gave no finite log-probability for {missing} sampled token(s): the "
                "teacher gives them probability 0, or the server does not return the actual token's log-probability."
            )
        ids = torch.tensor(top_ids, dtype=torch.long).reshape(-1, self.top_logprobs)
        if not self.exact_entropy:
            return ServedTeacherLogProbs(top, ids, target)
        if len(entropies) != target.numel():
            raise TeacherServerError(
                f"The teacher server at {self.url} returned the teacher's entropy for {len(entropies)} of "
                f"{target.numel()} tokens, though it returned it at start-up: was it restarted without trl-eopd's "
                f"vLLM plugin? Restart it with `{_PLUGIN_SERVER}`, then resume with `--resume_from_checkpoint`."
            )
        return ServedTeacherLogProbs(top, ids, target, torch.tensor(entropies, dtype=torch.float32))
