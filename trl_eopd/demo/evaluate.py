"""Sample from a model on held-out problems, grade every sample, and measure token entropy against the teacher."""

from __future__ import annotations

from math import comb

import torch

from ..loss import IGNORE_INDEX, eopd_loss_and_stats
from .task import IM_END, Problem, check_solution


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): the chance that k of the n samples, drawn without replacement, hold a hit."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


@torch.no_grad()
def sample_completions(model, tokenizer, problems: list[Problem], *, num_samples: int, seed: int, max_new_tokens: int,
                       batch_size: int = 1024):
    """`num_samples` completions per problem at temperature 1 (top-k 0, top-p 1), with their loss masks.

    Returns `(sequences, labels, prompt_length)`: `labels` holds the completion tokens up to and including the first
    `<|im_end|>` and -100 elsewhere, the convention of the trainer's on-policy batches.
    """
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    prompts = [
        tokenizer(tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        for p in problems
    ]
    # Every prompt lists the same number of numbers, so prompts share a length and need no padding.
    prompt_ids = torch.tensor(prompts).repeat_interleave(num_samples, dim=0)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    chunks = []
    for start in range(0, prompt_ids.size(0), batch_size):
        chunk = prompt_ids[start : start + batch_size].to(device)
        out = model.generate(
            input_ids=chunk, attention_mask=torch.ones_like(chunk), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
        )
        padded = torch.full((out.size(0), prompt_ids.size(1) + max_new_tokens), tokenizer.pad_token_id, device=device)
        padded[:, : out.size(1)] = out
        chunks.append(padded.cpu())
    sequences = torch.cat(chunks)
    prompt_length = prompt_ids.size(1)
    completion = sequences[:, prompt_length:]
    is_eos = completion == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], completion.size(1),
                                                                                     dtype=torch.long))
    keep = torch.arange(completion.size(1)).unsqueeze(0) <= first_eos.unsqueeze(1)
    labels = torch.full_like(sequences, IGNORE_INDEX)
    labels[:, prompt_length:] = torch.where(keep, completion, torch.full_like(completion, IGNORE_INDEX))
    return sequences, labels, prompt_length


def grade(tokenizer, problems: list[Problem], sequences, prompt_length: int, num_samples: int, ks) -> dict:
    """pass@k for every k in `ks`, distinct correct solutions per problem and the share of each problem's solutions
    found, all averaged over problems."""
    per_problem = []
    for i, problem in enumerate(problems):
        correct, found = 0, set()
        for j in range(num_samples):
            tokens = tokenizer.convert_ids_to_tokens(sequences[i * num_samples + j, prompt_length:].tolist())
            if IM_END not in tokens:
                continue
            subset = check_solution(problem, tokens[: tokens.index(IM_END)])
            if subset is not None:
                correct += 1
                found.add(subset)
        per_problem.append((correct, len(found), len(found) / len(problem.solutions)))
    n = len(problems)
    result = {f"pass@{k}": sum(pass_at_k(num_samples, c, k) for c, _, _ in per_problem) / n for k in ks}
    result["distinct_correct"] = sum(d for _, d, _ in per_problem) / n
    result["solution_coverage"] = sum(cov for _, _, cov in per_problem) / n
    return result


@torch.no_grad()
def token_statistics(model, teacher, sequences, labels, *, entropy_threshold: float, batch_size: int = 512) -> dict:
    """Entropy and divergences on the completion tokens of `model`'s own rollouts.

    The teacher scores the same rollouts, as it does during on-policy distillation, so `high_entropy_ratio_teacher`
    is the share of tokens the EOPD gate would select and `forward_kl_high_entropy` is the forward KL on exactly those.
    """
    device = next(model.parameters()).device
    totals, own_high = None, 0.0
    for start in range(0, sequences.size(0), batch_size):
        ids = sequences[start : start + batch_size].to(device)
        lab = labels[start : start + batch_size].to(device)
        # Positions after the first end-of-turn are padding for the model; before it every token is real.
        attention_mask = torch.ones_like(ids)
        attention_mask[:, 1:] = (lab[:, 1:] != IGNORE_INDEX) | (lab[:, :-1] == IGNORE_INDEX)
        student_logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
        teacher_logits = teacher(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
        shifted = lab[:, 1:]
        _, stats = eopd_loss_and_stats(student_logits, teacher_logits, shifted, entropy_threshold=entropy_threshold)
        packed = stats.to_tensor().cpu()
        totals = packed if totals is None else totals + packed
        log_probs = student_logits[shifted != IGNORE_INDEX].float().log_softmax(-1)
        own_high += float(((-(log_probs.exp() * log_probs).sum(-1)) > entropy_threshold).sum())
    stats = type(stats).from_tensor(totals)
    means = stats.means()
    return {
        "num_tokens": float(stats.num_tokens),
        "token_entropy": means["eopd/student_entropy"],
        "teacher_entropy": means["eopd/teacher_entropy"],
        "high_entropy_ratio_own": own_high / max(float(stats.num_tokens), 1.0),
        "high_entropy_ratio_teacher": means["eopd/high_entropy_ratio"],
        "reverse_kl": means["eopd/reverse_kl"],
        "forward_kl": means["eopd/forward_kl"],
        "forward_kl_high_entropy": means["eopd/forward_kl_high_entropy"],
    }


def evaluate(model, teacher, tokenizer, problems, *, num_samples: int, seed: int, max_new_tokens: int,
             entropy_threshold: float, ks=range(1, 9)) -> dict:
    """Every number the demo reports for one model and one sampling seed."""
    model.eval()
    sequences, labels, prompt_length = sample_completions(
        model, tokenizer, problems, num_samples=num_samples, seed=seed, max_new_tokens=max_new_tokens
    )
    result = grade(tokenizer, problems, sequences, prompt_length, num_samples, ks)
    result.update(token_statistics(model, teacher, sequences, labels, entropy_threshold=entropy_threshold))
    return result
