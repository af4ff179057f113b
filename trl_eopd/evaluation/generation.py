"""Sampling completions with vLLM when it is available, or with transformers' `generate` otherwise."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

# The paper specifies only "a zero-shot prompt that asks for the final answer in \boxed{}"; this is the widely used
# wording of such a prompt. Its hash goes into every result, so a run with another wording is never compared to it.
DEFAULT_PROMPT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."

# Chat models end a turn with one of these rather than with the tokenizer's EOS. A base student trained to chat (its
# EOS is `<|endoftext|>`, its chat teacher's `<|im_end|>`) can emit either, and decoding past the end of its turn only
# wastes the token budget.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def prompt_template_hash(
    template: str, chat_template: bool = False, chat_template_kwargs: dict[str, Any] | None = None
) -> str:
    """
    Short, stable fingerprint of the prompt format, recorded in results so that runs can be compared safely.

    Args:
        template (`str`):
            The user-message template.
        chat_template (`bool`, *optional*, defaults to `False`):
            Whether the message is wrapped in the tokenizer's chat template. The template's own text is not hashed,
            so that checkpoints of one model family, whose tokenizers may differ in whitespace, stay comparable.
        chat_template_kwargs (`dict` or `None`, *optional*):
            Extra chat-template variables (e.g. `{"enable_thinking": False}`), which change the prompt too.

    Returns:
        `str`: 16 hex digits.
    """
    key = {
        "template": template,
        "chat_template": bool(chat_template),
        "chat_template_kwargs": chat_template_kwargs or {},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def render_prompt(
    tokenizer,
    problem: str,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    use_chat_template: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
):
    """
    Turn a problem into the text the model is conditioned on.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        problem (`str`):
            Problem statement.
        template (`str`, *optional*, defaults to `DEFAULT_PROMPT_TEMPLATE`):
            User message, with `{problem}` where the problem goes. Substitution is literal, so braces in the problem
            or the template (`\\boxed{}`) are safe.
        use_chat_template (`bool`, *optional*, defaults to `True`):
            Wrap the message in the tokenizer's chat template, with the generation prompt, when it has one.
        chat_template_kwargs (`dict` or `None`, *optional*):
            Extra variables for the chat template, e.g. `{"enable_thinking": False}` for Qwen3 templates.

    Returns:
        `tuple[str, bool]`: The prompt text, and whether the chat template was applied (in which case the template
        already holds any BOS token and tokenising must not add special tokens again).
    """
    message = template.replace("{problem}", problem)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}],
            tokenize=False,
            add_generation_prompt=True,
            **(chat_template_kwargs or {}),
        )
        return text, True
    return message, False


def stop_token_ids(tokenizer, generation_config=None, chat: bool = False) -> list[int]:
    """
    Token ids that end a completion: the generation config's and tokenizer's EOS, plus end-of-turn tokens in chat.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        generation_config ([`~transformers.GenerationConfig`] or `None`, *optional*):
            The checkpoint's generation config.
        chat (`bool`, *optional*, defaults to `False`):
            Whether prompts use the chat template.

    Returns:
        `list[int]`: Sorted, unique ids.
    """
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]) + [tokenizer.eos_token_id]:
        if value is not None:
            ids.add(int(value))
    if chat:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab)
    return sorted(ids)


@dataclass(frozen=True)
class SamplingSettings:
    """
    How completions are sampled.

    Args:
        n (`int`):
            Samples per problem.
        temperature (`float`):
            Sampling temperature; 0 decodes greedily.
        top_p (`float`):
            Nucleus sampling mass. Top-k filtering is always off, whatever the checkpoint's generation config says.
        max_new_tokens (`int`):
            Length limit of a completion.
        seed (`int`):
            Random seed.
    """

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int = 0


@dataclass
class Completion:
    """
    One sampled completion.

    Args:
        text (`str`):
            Decoded text, special tokens removed.
        num_tokens (`int`):
            Generated tokens, the stop token included.
        finished (`bool`):
            `True` when it ended on a stop token, `False` when it hit `max_new_tokens`.
    """

    text: str
    num_tokens: int
    finished: bool


def cut_at_stop(tokens: Sequence[int], stop_ids: Collection[int]) -> tuple[list[int], bool]:
    """
    A sampled completion up to and including its first stop token.

    `generate` pads a finished sequence until the longest one in its batch ends; this drops that padding, so that the
    completion is what the model actually wrote.

    Args:
        tokens (`Sequence[int]`):
            Generated token ids, without the prompt.
        stop_ids (`Collection[int]`):
            Tokens that end a completion.

    Returns:
        `tuple[list[int], bool]`: The kept tokens, and whether they end on a stop token (`False` when the completion
        ran into the length limit, in which case every token is kept).
    """
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[: index + 1]), True
    return list(tokens), False


def vllm_available() -> bool:
    """Whether vLLM is installed and a CUDA device is visible (vLLM needs a GPU here)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    """
    Resolve `"auto"` to `"vllm"` when [`vllm_available`], else to `"transformers"`.

    Args:
        backend (`str`):
            `"auto"`, `"vllm"` or `"transformers"`.

    Returns:
        `str`: `"vllm"` or `"transformers"`.
    """
    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from .._vllm_install import vllm_install_hint

        raise ImportError(f"--backend vllm needs vLLM, which is not installed: {vllm_install_hint()}.")
    if backend not in ("vllm", "transformers"):
        raise ValueError(f"Unknown backend {backend!r}; choose auto, vllm or transformers.")
    return backend


class TransformersGenerator:
    """
    Samples with `model.generate`, all `n` samples of a batch of prompts in one call, left-padded.

    Args:
        model_name_or_path (`str` or [`~transformers.PreTrainedModel`]):
            Checkpoint to load with `AutoModelForCausalLM.from_pretrained`, or a model already loaded (used as it is,
            on its own device, and `dtype` is ignored).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        sampling ([`SamplingSettings`]):
            Sampling settings.
        stop_ids (`Sequence[int]`):
            Tokens that end a completion.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weights dtype: `"auto"` (the checkpoint's), `"bfloat16"`, `"float16"` or `"float32"`.
        device (`str` or `None`, *optional*):
            Device; CUDA when available, else CPU.
    """

    def __init__(self, model_name_or_path, tokenizer, sampling, stop_ids, dtype="auto", device=None):
        import torch
        from transformers import AutoModelForCausalLM, set_seed

        self.tokenizer = tokenizer
        self.sampling = sampling
        self.stop_ids = list(stop_ids)
        if isinstance(model_name_or_path, str):
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype).to(self.device)
        else:
            self.model = model_name_or_path
            self.device = device or next(self.model.parameters()).device
        self.model.eval()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        set_seed(sampling.seed)

    def generate(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[Completion]]:
        """
        Sample `n` completions for each prompt.

        Args:
            prompt_ids (`Sequence[Sequence[int]]`):
                Tokenised prompts.

        Returns:
            `list[list[Completion]]`: For each prompt, its `n` completions.
        """
        stop = set(self.stop_ids)
        completions = []
        for samples in self.sample(prompt_ids):
            row = []
            for tokens in samples:
                finished = bool(tokens) and tokens[-1] in stop
                row.append(
                    Completion(
                        text=self.tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True),
                        num_tokens=len(tokens),
                        finished=finished,
                    )
                )
            completions.append(row)
        return completions

    def sample(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[list[int]]]:
        """
        Sample `n` completions for each prompt, as token ids.

        Args:
            prompt_ids (`Sequence[Sequence[int]]`):
                Tokenised prompts.

        Returns:
            `list[list[list[int]]]`: For each prompt, its `n` completions, each cut by [`cut_at_stop`] (the stop token
            kept).
        """
        import torch

        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):
            # Left padding keeps every prompt's last token at the same position, where generation starts.
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        s = self.sampling
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                # Temperature 0 is greedy decoding, as in vLLM.
                do_sample=s.temperature > 0,
                temperature=s.temperature if s.temperature > 0 else None,
                top_p=s.top_p if s.temperature > 0 else None,
                # transformers applies top_k=50 unless told otherwise; the protocol samples from the full nucleus.
                top_k=0 if s.temperature > 0 else None,
                repetition_penalty=1.0,
                max_new_tokens=s.max_new_tokens,
                num_return_sequences=s.n,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
        stop = set(self.stop_ids)
        completions = [cut_at_stop(tokens, stop)[0] for tokens in output[:, width:].tolist()]
        # generate() returns the n samples of each prompt next to each other.
        return [completions[i * s.n : (i + 1) * s.n] for i in range(len(prompt_ids))]


class VLLMGenerator:
    """
    Samples with vLLM's offline `LLM.generate`.

    Args:
        model_name_or_path (`str`):
            Checkpoint.
        tokenizer_name_or_path (`str`):
            Tokenizer checkpoint.
        sampling ([`SamplingSettings`]):
            Sampling settings.
        stop_ids (`Sequence[int]`):
            Tokens that end a completion.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weights dtype.
    """

    def __init__(self, model_name_or_path, tokenizer_name_or_path, sampling, stop_ids, dtype="auto"):
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model_name_or_path, tokenizer=tokenizer_name_or_path, dtype=dtype, seed=sampling.seed)
        # Completions are decoded with the same tokenizer call as the transformers backend: vLLM's incremental
        # detokenizer holds back a trailing partial UTF-8 character, so its text can differ for the same tokens.
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
        self.stop_ids = set(stop_ids)
        self.params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=-1,
            repetition_penalty=1.0,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(stop_ids),
            seed=sampling.seed,
        )

    def generate(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[Completion]]:
        """Sample `n` completions for each tokenised prompt; see [`TransformersGenerator.generate`]."""
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(ids)} for ids in prompt_ids], self.params, use_tqdm=False
        )
        return [[self._completion(list(o.token_ids), o.finish_reason) for o in output.outputs] for output in outputs]

    def _completion(self, tokens: list[int], finish_reason: str | None) -> Completion:
        # A stopped completion ends with its stop token, which the text leaves out (as the transformers backend does).
        finished = finish_reason != "length"
        kept = tokens[:-1] if finished and tokens and tokens[-1] in self.stop_ids else tokens
        return Completion(
            text=self.tokenizer.decode(kept, skip_special_tokens=True), num_tokens=len(tokens), finished=finished
        )
