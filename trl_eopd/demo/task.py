"""The demo's synthetic reasoning task: reach a target sum with numbers drawn from a given set.

A problem is a set of distinct numbers and a target that at least two different subsets of them add up to. A solution
takes numbers one at a time and writes what is left after each, e.g. for `numbers 2 3 5 7 9 target 12`:

    `7 left 5 , 5 left 0`   or   `9 left 3 , 3 left 0`   or   `2 left 10 , 3 left 7 , 7 left 0`

Every answer can be checked exactly, and a problem has several valid solutions, so a model trained on all of them has
genuine branch points (which number to take next, high entropy) between long stretches of forced tokens (the
subtraction, low entropy): the structure that EOPD's entropy gate is built for.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

# The same special tokens and ChatML template as the package's tiny models.
from ..tiny import CHAT_TEMPLATE, EOS_TOKEN, IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS  # noqa: E402

MAX_NUMBER = 12
SET_SIZE = 6
# Targets stay small so that the forced subtraction steps are a table a tiny model can learn quickly.
MIN_TARGET, MAX_TARGET = 10, 24
MAX_VALUE = MAX_TARGET
WORDS = ["user", "assistant", "system", "numbers", "target", "left", ","]


@dataclass(frozen=True)
class Problem:
    """One task instance: the available `numbers` (sorted, distinct), the `target`, and every valid subset."""

    numbers: tuple[int, ...]
    target: int
    solutions: tuple[tuple[int, ...], ...]

    @property
    def key(self) -> tuple:
        return (self.numbers, self.target)

    def prompt(self) -> str:
        return "numbers " + " ".join(map(str, self.numbers)) + f" target {self.target}"

    def messages(self, solution_text: str | None = None) -> list[dict]:
        messages = [{"role": "user", "content": self.prompt()}]
        if solution_text is not None:
            messages.append({"role": "assistant", "content": solution_text})
        return messages


def valid_subsets(numbers: tuple[int, ...], target: int) -> tuple[tuple[int, ...], ...]:
    """Every subset of at least two numbers that sums to `target`, each as a sorted tuple."""
    found = []
    for size in range(2, len(numbers) + 1):
        for subset in itertools.combinations(numbers, size):
            if sum(subset) == target:
                found.append(subset)
    return tuple(found)


def sample_problem(rng: random.Random, min_solutions: int = 2) -> Problem:
    """Draw a problem whose target has at least `min_solutions` valid subsets and is not itself one of the numbers."""
    while True:
        numbers = tuple(sorted(rng.sample(range(1, MAX_NUMBER + 1), SET_SIZE)))
        by_target: dict[int, list[tuple[int, ...]]] = {}
        for size in range(2, SET_SIZE + 1):
            for subset in itertools.combinations(numbers, size):
                by_target.setdefault(sum(subset), []).append(subset)
        targets = [
            t
            for t, subsets in by_target.items()
            if len(subsets) >= min_solutions and MIN_TARGET <= t <= MAX_TARGET and t not in numbers
        ]
        if targets:
            target = rng.choice(sorted(targets))
            return Problem(numbers, target, tuple(by_target[target]))


def make_problems(num_problems: int, seed: int, exclude: set | None = None) -> list[Problem]:
    """`num_problems` distinct problems, none of whose keys is in `exclude` (used to hold out the evaluation set)."""
    rng = random.Random(seed)
    exclude = set() if exclude is None else set(exclude)
    problems = []
    while len(problems) < num_problems:
        problem = sample_problem(rng)
        if problem.key not in exclude:
            exclude.add(problem.key)
            problems.append(problem)
    return problems


def solution_text(subset: tuple[int, ...], target: int) -> str:
    left, steps = target, []
    for number in subset:
        left -= number
        steps.append(f"{number} left {left}")
    return " , ".join(steps)


def sample_solution_text(problem: Problem, rng: random.Random) -> str:
    """A uniformly chosen valid subset, taken in a uniformly random order: the teacher's training distribution."""
    subset = list(rng.choice(problem.solutions))
    rng.shuffle(subset)
    return solution_text(tuple(subset), problem.target)


def check_solution(problem: Problem, words: list[str]) -> tuple[int, ...] | None:
    """The subset (sorted) that a completion uses if it is a valid solution, else None.

    `words` are the completion's tokens up to, not including, the end-of-turn token. Valid means: steps of the form
    `number left rest` joined by `,`, each number still available, each `rest` the exact remainder, ending at 0.
    """
    if not words or len(words) % 4 != 3:
        return None
    available, left, used = set(problem.numbers), problem.target, []
    for start in range(0, len(words), 4):
        step = words[start : start + 4]
        if step[1] != "left" or (len(step) == 4 and step[3] != ","):
            return None
        if not (step[0].isdigit() and step[2].isdigit()):
            return None
        number, rest = int(step[0]), int(step[2])
        if number not in available or rest != left - number:
            return None
        available.discard(number)
        used.append(number)
        left = rest
    if left != 0 or len(used) < 2:
        return None
    return tuple(sorted(used))


def build_tokenizer():
    """A word-level tokenizer over the task's vocabulary, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + [str(n) for n in range(MAX_VALUE + 1)])}
    vocab["<|unk|>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token="<|unk|>", model_max_length=64
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(path: str | Path):
    build_tokenizer().save_pretrained(str(path))


def conversations(problems: list[Problem], seed: int, per_problem: int = 1) -> list[dict]:
    """Chat rows (`messages`) with sampled diverse solutions, the format EOPDTrainer's default collator reads."""
    rng = random.Random(seed)
    return [
        {"messages": problem.messages(sample_solution_text(problem, rng))}
        for problem in problems
        for _ in range(per_problem)
    ]


EVAL_SEED = 10_000


def eval_problems(num_problems: int) -> list[Problem]:
    """The held-out evaluation problems: the first `num_problems` of a fixed stream, never seen in training."""
    return make_problems(num_problems, seed=EVAL_SEED)


def training_rows_fn(held_out: set, num_held_out: int = 512):
    """A `rows_fn` for [`supervised_train`] that draws fresh problems and fresh solutions, avoiding `held_out` keys."""
    held_out = set(held_out) | {p.key for p in eval_problems(num_held_out)}

    def rows_fn(step, rng, batch_size):
        rows = []
        while len(rows) < batch_size:
            problem = sample_problem(rng)
            if problem.key not in held_out:
                rows.append({"messages": problem.messages(sample_solution_text(problem, rng))})
        return rows

    return rows_fn
