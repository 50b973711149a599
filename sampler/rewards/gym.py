"""reasoning-gym task scorers: the package's own `score_answer` for each task.

The answer passed to the scorer is the reasoning-gym entry ({'question', 'answer', 'metadata'});
the task name comes from `task=` or the entry's metadata['source_dataset']. The completion's
answer is extracted first (default 'auto': boxed, <answer>, 'Answer:' line, last number).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from flywheel.sampler.record import Reward
from flywheel.sampler.rewards.extract import AnswerFormat, extract_answer
from flywheel.sampler.rewards.registry import Scorer, ScorerError, register_scorer


@cache
def _score_fn(task: str):
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(task)
    except Exception as exc:  # the package raises KeyError/ValueError depending on version
        raise ScorerError(f"reasoning-gym has no task {task!r}: {exc}") from None


@register_scorer("reasoning_gym")
def reasoning_gym_scorer(task: str | None = None, answer_format: AnswerFormat = "auto") -> Scorer:
    """The task's own score (0..1, partial credit where the task defines it) on the extracted answer."""
    if task is not None:
        _score_fn(task)  # fail at build time on an unknown task

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        entry = answer if isinstance(answer, dict) else {"answer": answer, "metadata": {}}
        name = task or entry.get("metadata", {}).get("source_dataset") or context.get("task")
        if not name:
            raise ScorerError("reasoning_gym scorer: no task= option and the answer has no metadata.source_dataset")
        predicted, how = extract_answer(completion, answer_format)
        value = float(_score_fn(name)(predicted, entry)) if predicted is not None else 0.0
        return Reward(
            name="reasoning_gym", value=value, details={"task": name, "extracted": predicted, "extractor": how}
        )

    return score
