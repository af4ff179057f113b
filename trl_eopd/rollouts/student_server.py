"""The student's own vLLM server: start-up checks, weight pushes and sampling, over plain HTTP.

The server is vLLM's OpenAI-compatible entry point started with `VLLM_SERVER_DEV_MODE=1` (for `/collective_rpc` and
`/reset_prefix_cache`) and `--logprobs-mode processed_logprobs` (the sampled tokens' log-probs after temperature, the
distribution actually sampled from); a LoRA student's server also needs `--enable-lora --max-lora-rank R` and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. docs/vllm.md gives the command. Nothing here imports vLLM.
"""

from __future__ import annotations

import math
import os

from ..server_http import VLLMServerConnection

START_COMMAND = (
    "VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model STUDENT "
    "--logprobs-mode processed_logprobs"
)
# The name the LoRA student's adapter is served under; requests name it instead of the base model.
LORA_ADAPTER_NAME = "eopd-student"


class StudentServerError(RuntimeError):
    """The student's server cannot be used: unreachable, serving another model, or failing mid-run."""


def _same_model(name: str, served: dict) -> bool:
    candidates = {served.get("id"), served.get("root")} - {None}
    if name in candidates:
        return True
    # A local folder may be named by another path (relative, through a link) on either side.
    if os.path.isdir(name):
        real = os.path.realpath(name)
        return any(os.path.isdir(c) and os.path.realpath(c) == real for c in candidates)
    return False


class StudentServer(VLLMServerConnection):
    """A vLLM server hosting the student, checked at construction.

    Args:
        url (`str`): the server's base URL.
        timeout (`float`): seconds to wait for the server to come up, and for each request.
        retries (`int`): retries of a failed request before [`StudentServerError`].
        student_name (`str`): the student's `name_or_path`; the server must serve that model.
        vocab_size (`int`): rows of the student's output layer; the served vocabulary must match it.
        lora (`bool`): whether the student is a LoRA adapter, pushed as such and named in requests.
    """

    error_class = StudentServerError
    role = "student's vLLM server"
    timeout_field = "vllm_server_timeout"
    retries_field = "vllm_server_retries"
    start_hint = f"Start it with `{START_COMMAND}` (docs/vllm.md), or fix `vllm_server_base_url`"

    def __init__(self, url: str, *, timeout: float, retries: int, student_name: str, vocab_size: int,
                 lora: bool = False):  # fmt: skip
        super().__init__(url, timeout=timeout, retries=retries)
        self.lora = lora
        self._wait_until_healthy()
        base_models = [model for model in self._served_models() if model.get("parent") is None]
        if len(base_models) != 1:
            raise StudentServerError(
                f"The student's vLLM server at {self.url} serves {len(base_models)} base models; it must serve "
                "exactly the student."
            )
        served = base_models[0]
        self.model_name = served["id"]
        self.max_model_len = int(served["max_model_len"])
        if not _same_model(student_name, served):
            raise StudentServerError(
                f"The student's vLLM server at {self.url} serves {served.get('root') or self.model_name!r}, but the "
                f"student is {student_name!r}. Start the server with `--model {student_name}`: the weights pushed "
                "each step only replace those of the same architecture."
            )
        served_vocab = self._served_vocab_size(int(vocab_size))
        if served_vocab != vocab_size:
            raise StudentServerError(
                f"The student's vLLM server at {self.url} has a vocabulary of {served_vocab} token ids but the "
                f"student ({student_name!r}) has {vocab_size}: it serves another model."
            )
        self.request_model = LORA_ADAPTER_NAME if lora else self.model_name

    # -------------------------------------------------------------------------------------------------- weights

    def load_weights(self, folder: str, global_step: int, *, adapter: bool) -> None:
        """Make the server sample with the weights in `folder` (see `weights.py`), then drop its prefix cache.

        `adapter`: `folder` holds a LoRA adapter, served under `LORA_ADAPTER_NAME`; else full checkpoint weights."""
        if adapter:
            path, payload = "/v1/load_lora_adapter", {"lora_name": LORA_ADAPTER_NAME, "lora_path": folder,
                                                      "load_inplace": True}  # fmt: skip
            missing = (
                "the runtime LoRA endpoint is off: start the server with `--enable-lora --max-lora-rank R` (R at "
                "least the adapter's rank) and the environment variable `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`"
            )
        else:
            path, payload = "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": folder}}
            missing = (
                "`/collective_rpc` is off: start the server with the environment variable `VLLM_SERVER_DEV_MODE=1`"
            )
        try:
            self._post_with_retries(path, payload, global_step, final_statuses=(400, 404), parse_json=False)
        except StudentServerError as error:
            if "HTTP 404" in str(error):
                raise StudentServerError(
                    f"The student's vLLM server at {self.url} cannot receive weights: {missing}."
                ) from error
            raise StudentServerError(
                f"{error} The weights were in {folder}, which the server must be able to read "
                "(`vllm_server_weights_dir`)."
            ) from error
        # KV computed with the previous weights must never serve a prompt again.
        self._post_with_retries("/reset_prefix_cache", {}, global_step, parse_json=False)

    # -------------------------------------------------------------------------------------------------- sampling

    def sample(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, stop_token_ids: list[int],
               global_step: int) -> tuple[list[list[int]], list[list[float]]]:  # fmt: skip
        """One completion per prompt (token ids, cut after the stop token, which is kept) and the log-prob of each
        sampled token under the distribution it was sampled from."""
        if not prompts:
            return [], []
        # The `generate` path's sampling: temperature only, no top-k/top-p/min-p truncation, no penalty.
        payload = {
            "model": self.request_model,
            "prompt": prompts,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "stop_token_ids": stop_token_ids,
            "logprobs": 0,
            "return_token_ids": True,
        }
        answer = self._post_with_retries("/v1/completions", payload, global_step)
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        if len(choices) != len(prompts):
            raise StudentServerError(
                f"The student's vLLM server at {self.url} returned {len(choices)} completions for {len(prompts)} "
                f"prompts at global step {global_step}."
            )
        completions, logprobs = [], []
        for choice in choices:
            ids = list(choice["token_ids"])
            values = (choice.get("logprobs") or {}).get("token_logprobs") or []
            if len(values) != len(ids):
                raise StudentServerError(
                    f"The student's vLLM server at {self.url} returned {len(values)} log-probs for {len(ids)} "
                    "sampled tokens."
                )
            completions.append(ids)
            logprobs.append([math.nan if value is None else float(value) for value in values])
        return completions, logprobs
