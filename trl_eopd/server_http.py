"""Plain-HTTP access to an OpenAI-compatible vLLM server, shared by the served teacher and the student's server.

Bounded everywhere: waiting for the server to come up, every request, and the retries of a failed one, so that a
server that is down, dies or stalls ends in an error naming its URL, never in a hang.
"""

from __future__ import annotations

import json
import time


class VLLMServerConnection:
    """A session to one vLLM server; subclasses set the names used in their error messages.

    Args:
        url (`str`): the server's base URL.
        timeout (`float`): seconds to wait for the server to come up, and for each request.
        retries (`int`): retries of a failed request before `error_class` is raised.
    """

    error_class: type[Exception] = RuntimeError
    # "The {role} at {url} ..." in every message, and the configuration fields and start command they point to.
    role = "vLLM server"
    timeout_field = "timeout"
    retries_field = "retries"
    start_hint = "start the server"

    def __init__(self, url: str, *, timeout: float, retries: int):
        import requests

        self.url = url.strip().rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._session = requests.Session()

    def _wait_until_healthy(self) -> None:
        import requests

        deadline = time.monotonic() + self.timeout
        last_error = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error_class(
                    f"The {self.role} at {self.url} did not answer GET /health within "
                    f"`{self.timeout_field}={self.timeout:g}` seconds ({last_error}). {self.start_hint}."
                )
            try:
                response = self._session.get(f"{self.url}/health", timeout=min(remaining, 5.0))
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except requests.RequestException as error:
                last_error = type(error).__name__
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))

    def _post(self, path: str, payload: dict) -> tuple[int, str]:
        """POST `payload` as JSON; the status and body, or `error_class` when the server does not answer in time."""
        import requests

        try:
            response = self._session.post(f"{self.url}{path}", json=payload, timeout=self.timeout)
        except requests.RequestException as error:
            raise self.error_class(
                f"The {self.role} at {self.url} did not answer within {self.timeout:g} s: {error}"
            ) from error
        return response.status_code, response.text

    def _request(self, method: str, path: str, *, what: str, **kwargs) -> dict:
        import requests

        try:
            response = self._session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            raise self.error_class(
                f"The {self.role} at {self.url} did not answer {what} within {self.timeout:g} s: {error}"
            ) from error
        if response.status_code != 200:
            raise self.error_class(
                f"The {self.role} at {self.url} answered HTTP {response.status_code} to {what}: {response.text[:300]}"
            )
        return response.json()

    def _post_with_retries(self, path: str, payload: dict, global_step: int, final_statuses=(400,),
                           parse_json: bool = True):  # fmt: skip
        """POST with up to `retries` retries (exponential backoff); the answer (parsed, or its text), or `error_class`
        naming the step. An answer with a status in `final_statuses` (a malformed request stays so) is not retried."""
        failures = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 30.0))
            try:
                status, body = self._post(path, payload)
            except self.error_class as error:
                failures.append(str(error.__cause__ or error))
                continue
            if status == 200:
                return json.loads(body) if parse_json else body
            failures.append(f"HTTP {status}: {body[:200]}")
            if status in final_statuses:
                break
        raise self.error_class(
            f"The {self.role} at {self.url} failed at global step {global_step} after {len(failures)} attempt(s) "
            f"(`{self.retries_field}={self.retries}`); last error: {failures[-1]}. Training stopped; checkpoints "
            "already saved are intact: restart the server and resume with `--resume_from_checkpoint`."
        )

    def _served_models(self) -> list[dict]:
        return self._request("GET", "/v1/models", what="GET /v1/models").get("data") or []

    def _accepts_token(self, token_id: int) -> bool:
        """Whether the server accepts `token_id` in a prompt: vLLM rejects ids beyond its vocabulary with HTTP 400."""
        status, body = self._post("/v1/completions", {"model": self.model_name, "prompt": [[token_id]],
                                                      "max_tokens": 1, "temperature": 1.0})  # fmt: skip
        if status == 200:
            return True
        if status == 400 and "out of vocabulary" in body:
            return False
        raise self.error_class(f"The {self.role} at {self.url} answered HTTP {status} to a probe: {body[:300]}")

    def _served_vocab_size(self, expected: int) -> int:
        """`expected` if the server's vocabulary has exactly that many ids, else the size it has."""
        # An unpatched server reports no vocabulary size, but it rejects token ids beyond
        # max(tokenizer ids, model vocabulary): the last expected id must pass and the next one must not.
        if self._accepts_token(expected - 1) and not self._accepts_token(expected):
            return expected
        low, high = 0, 1  # the served size is the first id the server rejects
        while self._accepts_token(high) and high < 2**26:
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self._accepts_token(middle) else (low, middle)
        return high

    def close(self) -> None:
        self._session.close()
