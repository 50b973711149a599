"""Answer-matching scorers: math equivalence (math-verify), exact match, regex, multiple choice."""

from __future__ import annotations

import re
import threading
from typing import Any

from flywheel.sampler.record import Reward
from flywheel.sampler.rewards.extract import AnswerFormat, extract_answer, strip_think
from flywheel.sampler.rewards.registry import Scorer, ScorerError, register_scorer

# sympy can take a very long time on adversarial input; math-verify's own timeout uses SIGALRM,
# which only works in the main thread, so off the main thread we bound the input length instead.
_MAX_ANSWER_CHARS = 300


def _math_timeout(seconds: int) -> int | None:
    return seconds if threading.current_thread() is threading.main_thread() else None


def _as_latex(text: str) -> str:
    # math-verify's latex extractor wants math delimiters around an extracted bare answer.
    return text if "$" in text else f"${text}$"


def math_equal(predicted: str, gold: Any, timeout_s: int = 5) -> bool:
    timeout = _math_timeout(timeout_s)
    import math_verify  # imported on first use: registering the scorers stays light (sympy, antlr)

    gold_parsed = math_verify.parse(_as_latex(str(gold)), parsing_timeout=timeout)
    pred_parsed = math_verify.parse(_as_latex(predicted[:_MAX_ANSWER_CHARS]), parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


@register_scorer("math_verify")
def math_verify_scorer(answer_format: AnswerFormat = "auto", timeout_s: int = 5) -> Scorer:
    """1.0 when the extracted answer is mathematically equivalent to the reference (math-verify)."""

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        predicted, how = extract_answer(completion, answer_format)
        ok = predicted is not None and math_equal(predicted, answer, timeout_s)
        return Reward(name="math_verify", value=float(ok), details={"extracted": predicted, "extractor": how})

    return score


def _normalize(text: str, case_sensitive: bool) -> str:
    text = " ".join(str(text).split()).strip().rstrip(".")
    return text if case_sensitive else text.lower()


@register_scorer("exact_match")
def exact_match_scorer(answer_format: AnswerFormat = "auto", case_sensitive: bool = False) -> Scorer:
    """1.0 when the extracted answer equals the reference after whitespace (and case) normalisation."""

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        predicted, how = extract_answer(completion, answer_format)
        refs = answer if isinstance(answer, list) else [answer]
        ok = predicted is not None and any(
            _normalize(predicted, case_sensitive) == _normalize(r, case_sensitive) for r in refs
        )
        return Reward(name="exact_match", value=float(ok), details={"extracted": predicted, "extractor": how})

    return score


@register_scorer("regex")
def regex_scorer(pattern: str, group: int | str | None = None, flags: str = "") -> Scorer:
    """With `group`: 1.0 when that group of the last match equals the answer. Without: 1.0 when the pattern matches."""
    try:
        compiled = re.compile(pattern, sum(getattr(re, f) for f in flags.upper()) if flags else 0)
    except (re.error, AttributeError) as exc:
        raise ScorerError(f"regex scorer: bad pattern or flags: {exc}") from None

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        matches = list(compiled.finditer(completion))
        if group is None:
            return Reward(name="regex", value=float(bool(matches)), details={"matched": bool(matches)})
        found = matches[-1].group(group) if matches else None
        ok = found is not None and _normalize(found, True) == _normalize(answer, True)
        return Reward(name="regex", value=float(ok), details={"extracted": found})

    return score


def extract_choice(text: str, choices: str) -> str | None:
    """The letter a completion picked: 'Answer: B', '\\boxed{B}', '(B)', 'B.' or a lone capital B."""
    text = strip_think(text)
    letters = re.escape(choices)
    patterns = [
        rf"answer\s*(?:is)?\s*[:=]?\s*\(?\**([{letters}])\b",
        rf"\\boxed\{{\s*\(?([{letters}])\)?\s*\}}",
        rf"^\s*\(?([{letters}])[\).:]",
        rf"\(([{letters}])\)",
        rf"\b([{letters}])\b",
    ]
    for p in patterns:
        found = re.findall(p, text, re.IGNORECASE | re.MULTILINE if p.startswith("answer") else re.MULTILINE)
        if found:
            return found[-1].upper()
    return None


@register_scorer("multiple_choice")
def multiple_choice_scorer(choices: str = "ABCD") -> Scorer:
    """1.0 when the picked letter equals the answer (a letter, or a 0-based index into `choices`)."""
    choices = choices.upper()

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        gold = choices[answer] if isinstance(answer, int) else str(answer).strip().upper()
        picked = extract_choice(completion, choices)
        return Reward(name="multiple_choice", value=float(picked == gold), details={"picked": picked, "gold": gold})

    return score
