"""Sample from a model on held-out problems, grade every sample, and measure token entropy against the teacher."""

from __future__ import annotations

import torch

from ..evaluation.generation import SamplingSettings, TransformersGenerator
from ..evaluation.passk import mean_pass_at_k, pass_at_k
from ..loss import IGNORE_INDEX, eopd_loss_and_stats
from .task import IM_END, Problem, check_solution

# `pass_at_k` stays importable from here, where the demo's users and tests have always found it.
__all__ = ["evaluate", "grade", "pass_at_k", "sample_completions", "token_statistics"]


def sample_completions(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    num_samples: int,
    seed: int,
    max_new_tokens: int,
    top_p: float = 1.0,
    batch_size: int = 1024,
):
    """`num_samples` completions per problem at temperature 1 (top-k 0, nucleus mass `top_p`), with their loss masks.

    Returns `(sequences, labels)`: `labels` holds the completion tokens up to and including the first
    `<|im_end|>` and -100 elsewhere, the convention of the trainer's on-policy batches.
    """
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for p in problems
    ]
    sampling = SamplingSettings(n=num_samples, temperature=1.0, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    generator = TransformersGenerator(model, tokenizer, sampling, [eos_id])
    # `batch_size` counts sequences; every prompt brings `num_samples` of them.
    prompts_per_call = max(batch_size // num_samples, 1)
    completions = [
        tokens
        for start in range(0, len(prompts), prompts_per_call)
        for samples in generator.sample(prompts[start : start + prompts_per_call])
        for tokens in samples
    ]
    # Every prompt lists the same number of numbers, so prompts share a length and need no padding.
    prompt_length = len(prompts[0])
    sequences = torch.full((len(completions), prompt_length + max_new_tokens), tokenizer.pad_token_id)
    labels = torch.full_like(sequences, IGNORE_INDEX)
    for row, tokens in enumerate(completions):
        sequences[row, :prompt_length] = torch.tensor(prompts[row // num_samples])
        end = prompt_length + len(tokens)
        sequences[row, prompt_length:end] = torch.tensor(tokens)
        labels[row, prompt_length:end] = sequences[row, prompt_length:end]
    return sequences, labels


def grade(tokenizer, problems: list[Problem], labels, num_samples: int, ks) -> dict:
    """pass@k for every k in `ks`, distinct correct solutions per problem and the share of each problem's solutions
    found, all averaged over problems."""
    per_problem = []
    for i, problem in enumerate(problems):
        correct, found = 0, set()
        for j in range(num_samples):
            row = labels[i * num_samples + j]
            tokens = tokenizer.convert_ids_to_tokens(row[row != IGNORE_INDEX].tolist())
            # A completion that ran out of tokens before its end-of-turn is wrong, whatever it holds.
            if not tokens or tokens[-1] != IM_END:
                continue
            subset = check_solution(problem, tokens[:-1])
            if subset is not None:
                correct += 1
                found.add(subset)
        per_problem.append((correct, len(found), len(found) / len(problem.solutions)))
    n = len(problems)
    counts = [(num_samples, c) for c, _, _ in per_problem]
    result = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
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


def evaluate(
    model,
    teacher,
    tokenizer,
    problems,
    *,
    num_samples: int,
    seed: int,
    max_new_tokens: int,
    entropy_threshold: float,
    ks=range(1, 9),
    top_p: float = 1.0,
) -> dict:
    """Every number the demo reports for one model, one sampling seed and one nucleus mass `top_p`.

    The entropy numbers are measured on the rollouts sampled here, so with `top_p < 1` they describe the truncated
    sampler's output; the model's own distribution at every position is still scored in full.
    """
    model.eval()
    sequences, labels = sample_completions(
        model, tokenizer, problems, num_samples=num_samples, seed=seed, max_new_tokens=max_new_tokens, top_p=top_p
    )
    result = grade(tokenizer, problems, labels, num_samples, ks)
    result.update(token_statistics(model, teacher, sequences, labels, entropy_threshold=entropy_threshold))
    return result
