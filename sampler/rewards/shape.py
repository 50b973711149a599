"""Rewards on the shape of a completion rather than its correctness: format and length."""

from __future__ import annotations

import re
from typing import Any, Literal

from flywheel.sampler.record import Reward
from flywheel.sampler.rewards.registry import Scorer, ScorerError, register_scorer


@register_scorer("format_think")
def format_think_scorer(answer_pattern: str | None = None, think_opened_in_prompt: bool = False) -> Scorer:
    """1.0 for '<think>reasoning</think>' followed by a non-empty answer (matching `answer_pattern` if given).

    `think_opened_in_prompt`: the chat template already wrote '<think>', so the completion starts
    inside the block and only the closing tag is expected.
    """
    opening = "" if think_opened_in_prompt else r"\s*<think>"
    shape = re.compile(opening + r"(.*?)</think>(.*)\Z", re.DOTALL)
    answer_re = re.compile(answer_pattern, re.IGNORECASE) if answer_pattern else None

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        found = shape.match(completion)
        if not found:
            return Reward(
                name="format_think", value=0.0, details={"reason": "no <think>...</think> block at the start"}
            )
        reasoning, rest = found.group(1), found.group(2).strip()
        if "<think>" in rest or "</think>" in rest:
            return Reward(name="format_think", value=0.0, details={"reason": "more than one think block"})
        if not reasoning.strip() or not rest:
            return Reward(
                name="format_think", value=0.0, details={"reason": "empty reasoning or no answer after </think>"}
            )
        if answer_re and not answer_re.search(rest):
            return Reward(
                name="format_think", value=0.0, details={"reason": f"answer does not match {answer_pattern!r}"}
            )
        return Reward(name="format_think", value=1.0, details={})

    return score


@register_scorer("format_regex")
def format_regex_scorer(pattern: str) -> Scorer:
    """1.0 when the whole completion (stripped) matches `pattern` (re.DOTALL)."""
    compiled = re.compile(pattern, re.DOTALL)

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        return Reward(name="format_regex", value=float(bool(compiled.fullmatch(completion.strip()))), details={})

    return score


@register_scorer("length_penalty")
def length_penalty_scorer(
    target: int = 256, limit: int = 1024, unit: Literal["tokens", "chars"] = "tokens", truncated_penalty: float = 1.0
) -> Scorer:
    """0 up to `target`, falling linearly to -1 at `limit` (and below); -`truncated_penalty` when cut by max_tokens.

    Token counts come from the context (`completion_token_ids` or `completion_tokens`); without
    them, unit 'tokens' falls back to characters / 4.
    """
    if limit <= target:
        raise ScorerError(f"length_penalty: limit ({limit}) must be larger than target ({target})")

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        if unit == "chars":
            n = len(completion)
        elif context.get("completion_token_ids") is not None:
            n = len(context["completion_token_ids"])
        else:
            n = int(context.get("completion_tokens", len(completion) // 4))
        value = -min(1.0, max(0, n - target) / (limit - target))
        if context.get("finish_reason") == "length":
            value = min(value, -truncated_penalty)
        return Reward(name="length_penalty", value=value, details={"length": n, "unit": unit})

    return score
