"""A reward the tiny random Qwen3 learns in a few GRPO steps: for the loop's tests and benchmarks.

The reward is the fraction of completion tokens equal to TARGET, on a prompt (PROMPT_TEXT) that
ends in TARGET tokens: the tiny tied-embedding model copies tokens, so groups start with mixed
rewards (~0.04) and the signal is there from the first step. Scorer name for a config:
"clients.tiny_reward:target_fraction" (loaded by dotted path, sampler/rewards/registry.py).
"""

from __future__ import annotations

from flywheel.sampler.record import Reward

TARGET = 1000
PROMPT_TEXT = " Areatusatusatus"  # tokens [8713, 1000, 1000, 1000] in the Qwen tokenizer
SCORER = "flywheel.clients.tiny_reward:target_fraction"


def target_fraction(completion: str, answer, completion_token_ids=None, **context) -> Reward:
    """The learnable reward: share of completion tokens equal to TARGET."""
    ids = completion_token_ids or []
    return Reward(name="target_fraction", value=sum(t == TARGET for t in ids) / max(1, len(ids)))


def low_id_fraction(completion: str, answer, completion_token_ids=None, **context) -> Reward:
    """A reward any random-init model has signal on: share of completion tokens in the lower half of
    the Qwen vocabulary. A random model samples ids near-uniformly, so every group's rewards differ
    (~0.5 each) and none is dropped as uniform: for loop benchmarks of real shapes on the GPU."""
    ids = completion_token_ids or []
    return Reward(name="low_id_fraction", value=sum(t < 75_000 for t in ids) / max(1, len(ids)))
