"""The teacher-entropy plugin's patches of vLLM's prompt log-probabilities path (see `trl_eopd/_compat.py`).

In the engine, `GPUModelRunner._get_prompt_logprobs_dict` projects a request's prompt positions to full logits, takes
the float32 log-softmax (`Sampler.compute_logprobs`), keeps the top-K and the prompt token (`Sampler.gather_logprobs`)
and copies them into a per-request CPU buffer (`LogprobsTensors.empty_cpu`). While it runs, the buffer gets one more
column and `gather_logprobs` fills it with each position's entropy under `ENTROPY_TOKEN_ID`. In the API process the
extra column becomes one more entry of each position's answer. Only the prompt path is touched: sampled-token
log-probabilities, rejection sampling and requests without `prompt_logprobs` are unchanged.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading

from .. import _compat
from . import ENTROPY_TOKEN_ID, ENTROPY_TOKEN_TEXT, PLUGIN_NAME

# Rows of a prompt chunk whose entropy is taken at once: bounds the temporaries at 64 x vocabulary floats, next to the
# (positions x vocabulary) logits vLLM already holds.
_ENTROPY_ROWS = 64
_MARK = "_trl_eopd_teacher_entropy"
# Set while `_get_prompt_logprobs_dict` runs (the model runner's thread): the logprobs mode of its scores.
_prompt_path = threading.local()


def vllm_version_is_tested(version: str) -> bool:
    return ".".join(version.split(".")[:2]) in _compat.VLLM_ENTROPY_PLUGIN_TESTED_VERSIONS


def _resolve_targets() -> list[tuple[object, str, object]]:
    """`(owner, attribute, function)` per patch target, or a `RuntimeError` naming the first one that changed."""
    resolved = []
    for module_name, class_name, attribute, parameters in _compat.VLLM_ENTROPY_PLUGIN_TARGETS:
        where = f"{module_name}.{class_name + '.' if class_name else ''}{attribute}"
        try:
            module = importlib.import_module(module_name)
            owner = getattr(module, class_name) if class_name else module
            function = getattr(owner, attribute)
        except (ImportError, AttributeError) as error:
            raise RuntimeError(f"{where} is missing ({error})") from error
        found = list(inspect.signature(inspect.unwrap(function)).parameters)
        if found != parameters:
            raise RuntimeError(f"{where} takes {found}, not {parameters}")
        resolved.append((owner, attribute, function))
    return resolved


def entropy_of_rows(scores, logprobs_mode: str):
    """Entropy in nats (float64, `(N,)`) of each row's distribution; `scores` are log-probs, or logits in the
    `*_logits` modes. `0 * log 0` counts as 0 (vLLM's -inf log-probs of masked tokens)."""
    import torch

    entropy = torch.empty(scores.size(0), dtype=torch.float64, device=scores.device)
    for start in range(0, scores.size(0), _ENTROPY_ROWS):
        rows = scores[start : start + _ENTROPY_ROWS].float()
        log_probs = torch.log_softmax(rows, dim=-1) if logprobs_mode.endswith("_logits") else rows
        probs = log_probs.exp()
        terms = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
        entropy[start : start + _ENTROPY_ROWS] = -terms.sum(-1, dtype=torch.float64)
    return entropy


def _wrap_prompt_logprobs_dict(original):
    @functools.wraps(original)
    def get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        _prompt_path.logprobs_mode = self.model_config.logprobs_mode
        try:
            return original(self, hidden_states, num_scheduled_tokens)
        finally:
            _prompt_path.logprobs_mode = None

    return get_prompt_logprobs_dict


def _wrap_empty_cpu(original):
    @functools.wraps(original)
    def empty_cpu(num_positions, num_tokens_per_position):
        if getattr(_prompt_path, "logprobs_mode", None) is not None:
            num_tokens_per_position += 1  # room for the entropy column
        return original(num_positions, num_tokens_per_position)

    return empty_cpu


def _wrap_gather_logprobs(original):
    @functools.wraps(original)
    def gather_logprobs(logprobs, num_logprobs, token_ids):
        gathered = original(logprobs, num_logprobs, token_ids)
        mode = getattr(_prompt_path, "logprobs_mode", None)
        if mode is None:
            return gathered
        import torch

        entropy = entropy_of_rows(logprobs, mode).to(gathered.logprobs.dtype).unsqueeze(-1)
        ids = torch.full_like(gathered.logprob_token_ids[:, :1], ENTROPY_TOKEN_ID)
        return gathered._replace(
            logprob_token_ids=torch.cat([gathered.logprob_token_ids, ids], dim=1),
            logprobs=torch.cat([gathered.logprobs, entropy], dim=1),
        )

    return gather_logprobs


def _wrap_append_logprobs(original):
    @functools.wraps(original)
    def append_logprobs_for_next_position(request_logprobs, token_ids, logprobs, decoded_tokens, rank, num_logprobs):
        # The row is [prompt token, top-K..., entropy]; vLLM pairs it with K + 1 ranks and zip would drop the entropy.
        if num_logprobs != -1 and len(token_ids) == num_logprobs + 2 and token_ids[-1] == ENTROPY_TOKEN_ID:
            num_logprobs += 1
        return original(request_logprobs, token_ids, logprobs, decoded_tokens, rank, num_logprobs)

    return append_logprobs_for_next_position


def _wrap_convert_ids(original):
    @functools.wraps(original)
    def convert_ids_list_to_tokens(tokenizer, token_ids):
        if ENTROPY_TOKEN_ID not in token_ids:
            return original(tokenizer, token_ids)
        decoded = iter(original(tokenizer, [i for i in token_ids if i != ENTROPY_TOKEN_ID]))
        return [ENTROPY_TOKEN_TEXT if i == ENTROPY_TOKEN_ID else next(decoded) for i in token_ids]

    return convert_ids_list_to_tokens


_WRAPPERS = {
    "_get_prompt_logprobs_dict": (_wrap_prompt_logprobs_dict, False),
    "empty_cpu": (_wrap_empty_cpu, True),
    "gather_logprobs": (_wrap_gather_logprobs, True),
    "append_logprobs_for_next_position": (_wrap_append_logprobs, False),
    "convert_ids_list_to_tokens": (_wrap_convert_ids, False),
}


def _warn_on_model_runner_v2(logger) -> None:
    """Model Runner V2 (vLLM's default on GPUs with Triton) computes prompt log-probs elsewhere, unpatched: say so
    at its first prompt-logprobs batch, instead of answering without the entropy unannounced."""
    try:
        module = importlib.import_module("vllm.v1.worker.gpu.sample.prompt_logprob")
        worker = module.PromptLogprobsWorker
        original = worker.compute_prompt_logprobs
    except Exception:  # noqa: BLE001 - an optional warning; a vLLM without this runner needs none
        return
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def compute_prompt_logprobs(self, *args, **kwargs):
        if not getattr(self, _MARK, False):
            setattr(self, _MARK, True)
            logger.warning(
                "%s: this server runs vLLM's Model Runner V2, whose prompt log-probabilities the plugin does not "
                "patch: no entropy is returned, and trl-eopd's client falls back to the estimate. Restart the server "
                "with VLLM_USE_V2_MODEL_RUNNER=0 for the exact entropy.",
                PLUGIN_NAME,
            )
        return original(self, *args, **kwargs)

    setattr(compute_prompt_logprobs, _MARK, True)
    worker.compute_prompt_logprobs = compute_prompt_logprobs


def apply(logger) -> bool:
    """Patch the installed vLLM if it is a tested version and every target is as expected; log what happened."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    tested = ", ".join(f"{minor}.x" for minor in _compat.VLLM_ENTROPY_PLUGIN_TESTED_VERSIONS)
    if not vllm_version_is_tested(version):
        logger.warning(
            "%s: vLLM %s is not a version this plugin was tested with (%s), so it patches nothing: the server returns "
            "no entropy, and trl-eopd's client falls back to the estimate.", PLUGIN_NAME, version, tested,
        )  # fmt: skip
        return False
    try:
        targets = _resolve_targets()
    except RuntimeError as error:
        logger.warning(
            "%s: vLLM %s differs from what this plugin patches (%s), so it patches nothing: the server returns no "
            "entropy, and trl-eopd's client falls back to the estimate.", PLUGIN_NAME, version, error,
        )  # fmt: skip
        return False
    for owner, attribute, function in targets:
        if getattr(function, _MARK, False):
            continue  # loaded twice in this process
        wrap, static = _WRAPPERS[attribute]
        patched = wrap(function)
        setattr(patched, _MARK, True)
        setattr(owner, attribute, staticmethod(patched) if static else patched)
    _warn_on_model_runner_v2(logger)
    logger.info(
        "%s active (vLLM %s): prompt log-probabilities carry each position's entropy under token id %d.",
        PLUGIN_NAME, version, ENTROPY_TOKEN_ID,
    )  # fmt: skip
    return True
