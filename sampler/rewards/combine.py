"""Weighted combination of scorers: what a rollout's total reward is made of."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel.sampler.record import Reward
from flywheel.sampler.rewards.registry import Scorer, get_scorer, register_scorer


class RewardSpec(BaseModel):
    """One term of a reward: a scorer name (or dotted path), its weight and its options."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Registered scorer name or dotted path 'package.module:function'")
    weight: float = Field(default=1.0, description="Weight of this term in the total reward")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options for the scorer's factory")


class WeightedScorer:
    """Scores with each term; `score_all` gives the per-term Rewards (weights set), `__call__` their sum."""

    def __init__(self, specs: list[RewardSpec | dict[str, Any]]):
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec.model_validate(s) for s in specs]
        if not self.specs:
            raise ValueError("a weighted reward needs at least one scorer")
        self.scorers: list[Scorer] = [get_scorer(s.name, **s.options) for s in self.specs]

    def score_all(self, completion: str, answer: Any, **context: Any) -> list[Reward]:
        out = []
        for spec, scorer in zip(self.specs, self.scorers):
            reward = scorer(completion, answer, **context)
            out.append(reward.model_copy(update={"weight": spec.weight}))
        return out

    def __call__(self, completion: str, answer: Any, **context: Any) -> Reward:
        parts = self.score_all(completion, answer, **context)
        total = sum(r.value * r.weight for r in parts)
        return Reward(name="weighted", value=total, details={"parts": [r.model_dump() for r in parts]})


@register_scorer("weighted")
def weighted_scorer(scorers: list[dict[str, Any]]) -> Scorer:
    """Weighted sum: scorers=[{'name': 'math_verify', 'weight': 1.0}, {'name': 'format_think', 'weight': 0.2}]."""
    return WeightedScorer(scorers)
