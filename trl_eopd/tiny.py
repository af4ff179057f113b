"""Tiny, download-free models, tokenizer and chat dataset.

They let the README's first command, the tests and the smoke-test recipes run on a laptop with no network: everything
is built locally, saved with `save_pretrained` and loaded back through the real `from_pretrained` path, exactly as a
hub checkpoint would be. From Python, [`save_tiny_setup`] writes them to a folder of your choice.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, IM_START, IM_END]

# A ChatML template, the format of the Qwen3 chat teachers the paper distils from. `{% generation %}` is not needed:
# GKD's collator finds the completion by re-tokenising the prompt with `add_generation_prompt=True`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_NAMES = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal"]
_ITEMS = ["apples", "pears", "coins", "books", "cards", "stones"]


def toy_arithmetic_conversations(num_examples: int = 64, seed: int = 0) -> list[dict]:
    """Short word problems with a worked answer, in the `messages` format GKDTrainer's collator expects."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        question = f"{name} has {a} {item} and gets {b} more. How many {item} now?"
        answer = f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def _tokenizer_corpus() -> list[str]:
    corpus = []
    for row in toy_arithmetic_conversations(256, seed=1234):
        corpus.extend(message["content"] for message in row["messages"])
    corpus.extend(["user", "assistant", "system", "\n", "0123456789 +-*/=()\\{}[].,?!:;'\""])
    return corpus


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory on a small built-in corpus, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, model_max_length=1024
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    eos_token: str | list[str] | None = None,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    intermediate_size: int | None = None,
):
    """A randomly initialised Qwen3 causal LM sized to `tokenizer`'s vocabulary.

    `head_dim` defaults to `hidden_size // num_attention_heads`; vLLM's CPU attention needs at least 32. `vocab_size`
    (default: the tokenizer's) may be larger, as padded vocabularies are; `intermediate_size` defaults to twice the
    hidden size.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos_tokens = [eos_token] if isinstance(eos_token, str) else (eos_token or [IM_END, EOS_TOKEN])
    eos_ids = [tokenizer.convert_tokens_to_ids(token) for token in eos_tokens]
    head_dim = head_dim or hidden_size // num_attention_heads
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    return model


def save_tiny_setup(output_dir: str | os.PathLike, *, num_examples: int = 64, seed: int = 0) -> dict[str, str]:
    """Write a tiny random teacher and student, their tokenizer and a chat dataset to disk, to try EOPD offline.

    This is the Python route to the models the command line calls `tiny://teacher` and `tiny://student` (those names
    are understood by `trl-eopd` only, not by `from_pretrained`). Everything is built locally in a few seconds, with no
    download; the models are random, so a run only shows that the pipeline works.

    Args:
        output_dir (`str` or `os.PathLike`):
            Folder to write into; created if needed.
        num_examples (`int`, *optional*, defaults to `64`):
            Number of rows of the chat dataset (short arithmetic word problems with worked answers).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the model weights and of the dataset.

    Returns:
        `dict[str, str]`: `"teacher"` and `"student"`, model folders (each with the shared tokenizer) to pass to
        `from_pretrained` or straight to `EOPDTrainer`; `"dataset"`, a JSON-lines file with a `messages` column.

    Example:

    ```python
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_eopd import EOPDConfig, EOPDTrainer
    from trl_eopd.tiny import save_tiny_setup

    paths = save_tiny_setup("tiny-eopd")
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    dataset = load_dataset("json", data_files=paths["dataset"], split="train")
    args = EOPDConfig(output_dir="tiny-eopd/run", max_steps=4, max_new_tokens=24, report_to=[])
    trainer = EOPDTrainer(model=student, teacher_model=paths["teacher"], args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    ```
    """
    from ._compat import tell_deepspeed_when_cpu_only

    tell_deepspeed_when_cpu_only()  # saving is often the first thing to import DeepSpeed
    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer()
    paths = {"teacher": str(output_dir / "teacher"), "student": str(output_dir / "student")}
    # Its attention heads are 32 wide (two heads of a 64-wide model), so vLLM's CPU engine can serve it as a teacher.
    teacher = build_tiny_model(
        tokenizer,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        seed=seed,
    )
    # The student's head is untied (the teacher's is tied), so both layouts of an output layer are exercised; an
    # untied head is also the harder case for ZeRO-3, where nothing but the loss ever gathers it.
    # Its attention heads are 32 wide, the smallest vLLM's CPU engine runs, so `use_vllm` works on the tiny recipe too.
    student = build_tiny_model(
        tokenizer,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        seed=seed + 1,
        head_dim=32,
    )
    for key, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    paths["dataset"] = str(output_dir / "train.jsonl")
    with open(paths["dataset"], "w") as f:
        for row in toy_arithmetic_conversations(num_examples, seed=seed):
            f.write(json.dumps(row) + "\n")
    return paths


def sharpen_output(model, factor: float):
    """Multiply a tiny model's logits by `factor` (through its final norm's weight), in place, and return it.

    A randomly initialised model is nearly uniform (entropy close to log V everywhere); sharpened, its entropies spread
    over both sides of EOPD's 0.8-nat threshold, as a trained teacher's do, so that the gate has something to decide.
    """
    import torch

    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    return model


# The tiny teacher a vLLM server hosts in the served-teacher tests and measurements: 32-wide heads (the least vLLM's
# CPU engine runs) and logits sharpened 8x, which puts about a third of its sampled tokens above 0.8 nats.
SERVABLE_TEACHER_SEED = 11
SERVABLE_TEACHER_SHARPNESS = 8.0


def build_servable_tiny_teacher(tokenizer, *, seed: int = SERVABLE_TEACHER_SEED,
                                sharpness: float = SERVABLE_TEACHER_SHARPNESS):  # fmt: skip
    """A tiny teacher that vLLM's CPU engine can serve, with entropies on both sides of EOPD's gate."""
    model = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=32, seed=seed)  # fmt: skip
    return sharpen_output(model, sharpness)
