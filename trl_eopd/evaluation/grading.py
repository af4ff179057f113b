"""Answer grading with math-verify."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
    r"""
    Content of the last `\boxed{...}` (or `\fbox{...}`) in `text`, with nested braces matched.

    The prompt asks for the final answer in `\boxed{}`, so the last box is the answer. math-verify can find boxes
    itself, but it reads boxes that are close together or separated by a comma, a semicolon, "and" or "or" as one
    multi-part answer, so a completion that boxes a wrong guess and then a correction ("\boxed{7}. Wait, no:
    \boxed{12}") would be graded as the set of both; and it does not read `\fbox`. The tests list these cases.

    Args:
        text (`str`):
            A model completion.

    Returns:
        `str` or `None`: The text between the braces of the last complete box, or `None` if there is none.
    """
    best = None
    for command in _BOX_COMMANDS:
        start = text.rfind(command + "{")
        while start != -1:
            content = _braced(text, start + len(command))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            # An unclosed box (a truncated completion) is no answer; look for an earlier, complete one.
            start = text.rfind(command + "{", 0, start)
    return None if best is None else best[1]


def _braced(text: str, open_index: int) -> str | None:
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{" and text[index - 1] != "\\":
            depth += 1
        elif char == "}" and text[index - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
    return None


def strip_math_delimiters(answer: str) -> str:
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            return answer[len(left) : len(answer) - len(right)].strip()
    return answer


@dataclass
class GradeResult:
    """
    Outcome of grading one completion.

    Args:
        correct (`bool`):
            Whether math-verify judged the extracted answer equal to the reference.
        extracted (`str` or `None`):
            The answer string that was graded: the last box's content, or math-verify's own pick when the completion
            has no box; `None` when nothing could be extracted.
    """

    correct: bool
    extracted: str | None


class MathVerifyGrader:
    r"""
    Grades completions against reference answers with [math-verify](https://github.com/huggingface/Math-Verify).

    The answer of a completion is the content of its last `\boxed{}`. A completion without a box falls back to
    math-verify's anchored extraction ("the final answer is ..."), so a model that ignores the format instruction is
    still graded on what it said rather than scored zero outright.

    Args:
        timeout_seconds (`int` or `None`, *optional*, defaults to `5`):
            Time limit for each parse and each comparison. math-verify enforces it with `signal.alarm`, which only
            works in the main thread; elsewhere the limit is dropped.

    Example:

    ```python
    >>> grader = MathVerifyGrader()
    >>> grader.grade("so the answer is \\boxed{0.5}", "\\frac{1}{2}").correct
    True
    ```
    """

    def __init__(self, timeout_seconds: int | None = 5):
        try:
            import math_verify
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                'Grading needs math-verify: run `pip install -e ".[eval]"` in your trl-eopd clone.'
            ) from error
        self._mv = math_verify
        self.timeout_seconds = timeout_seconds
        # Boxed answers first: once the box is cut out, the boxed content is the whole string to parse.
        self._config = [
            math_verify.LatexExtractionConfig(boxed_match_priority=0),
            math_verify.ExprExtractionConfig(),
        ]
        self._gold_cache: dict[str, list[Any]] = {}

    def _timeout(self) -> int | None:
        return self.timeout_seconds if threading.current_thread() is threading.main_thread() else None

    def _parse(self, text: str) -> list[Any]:
        return self._mv.parse(text, extraction_config=self._config, parsing_timeout=self._timeout())

    def parse_reference(self, answer: str) -> list[Any]:
        """
        Parse a reference answer, as written in a benchmark's answer column (LaTeX without a box), once per answer.

        Args:
            answer (`str`):
                The reference answer, e.g. `"\\frac{1}{2}"` or `"$x=3$"`.

        Returns:
            `list`: math-verify's parsed forms, empty when the answer could not be parsed.
        """
        if answer not in self._gold_cache:
            self._gold_cache[answer] = self._parse("\\boxed{" + strip_math_delimiters(answer) + "}")
        return self._gold_cache[answer]

    def grade(self, completion: str, answer: str) -> GradeResult:
        """
        Grade one completion.

        Args:
            completion (`str`):
                The model's output text.
            answer (`str`):
                The reference answer.

        Returns:
            [`GradeResult`]: Whether it is correct, and the extracted answer.
        """
        boxed = last_boxed_content(completion)
        prediction = self._parse("\\boxed{" + boxed + "}") if boxed is not None else self._parse(completion)
        if boxed is not None:
            extracted = boxed.strip()
        elif prediction:
            extracted = str(prediction[-1])
        else:
            extracted = None
        gold = self.parse_reference(answer)
        if not prediction:
            return GradeResult(correct=False, extracted=extracted)
        if not gold:
            # A reference math-verify cannot parse (free text, say) can still be matched verbatim.
            reference = strip_math_delimiters(answer)
            return GradeResult(correct=extracted is not None and extracted == reference, extracted=extracted)
        correct = bool(self._mv.verify(gold, prediction, timeout_seconds=self._timeout()))
        return GradeResult(correct=correct, extracted=extracted)
