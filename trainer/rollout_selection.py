"""Which rollouts a GRPO step trains and with what reward: staleness, overlong handling, dynamic sampling.

`select_rollouts` applies, in this order, to records that come in whole groups:
    1. stale       policy_version more than max_staleness behind the learner's last push: dropped (dropped_stale)
    2. overlong    finish_reason 'length' (cut at max_tokens), grpo.overlong:
                     keep     trained like any other completion
                     filter   dropped (dropped_overlong)
                     penalty  DAPO's soft overlong punishment added to the reward (below; overlong_penalised)
    3. dynamic     grpo.dynamic_sampling: a group whose remaining rewards are all equal, or with one
                   member left, has zero advantage everywhere: its records are dropped
                   (dynamic_dropped_groups / dynamic_dropped_rollouts) and the queue source reads on
                   until batch_size trainable completions are in hand (DAPO's dynamic sampling)

Soft overlong punishment (DAPO, Yu et al. 2025), n = completion tokens, M = the record's max_tokens,
B = the buffer (grpo.overlong_buffer tokens, default M // 5), P = overlong_penalty:
    0                          n <= M - B
    -P * (n - (M - B)) / B     M - B < n <= M     (linear, reaching -P at max_tokens)
    -P                         cut at max_tokens (finish_reason 'length'), with or without M on the record
Dropped records stay in the step's record ids: acked with it once durable, never trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.sampler.record import RolloutRecord
from flywheel.trainer.config import GrpoLossConfig, TrainConfig


def is_stale(record: RolloutRecord, current_version: int, max_staleness: int) -> bool:
    """A rollout is stale when its oldest contributing version is more than max_staleness behind the policy."""
    return current_version - record.policy_version > max_staleness


def is_overlong(record: RolloutRecord, config: TrainConfig) -> bool:
    """A completion cut at max_tokens that grpo.overlong='filter' leaves out."""
    return config.grpo.overlong == "filter" and record.finish_reason == "length"


def overlong_penalty(record: RolloutRecord, grpo: GrpoLossConfig) -> float:
    """The soft overlong punishment of one completion (<= 0; see the module doc)."""
    n = len(record.completion_token_ids)
    limit = record.sampling.get("max_tokens")
    if record.finish_reason == "length":
        return -grpo.overlong_penalty  # cut at max_tokens: the end of the ramp, whatever the record says
    if limit is None:
        return 0.0
    limit = int(limit)
    buffer = min(limit // 5 if grpo.overlong_buffer is None else grpo.overlong_buffer, limit)
    start = limit - buffer
    if n <= start:
        return 0.0
    if n >= limit:
        return -grpo.overlong_penalty
    return -grpo.overlong_penalty * (n - start) / buffer


@dataclass
class Selection:
    records: list[RolloutRecord]  # the ones to train, in input order
    rewards: list[float]  # their rewards, with the overlong penalty when configured
    counts: dict[str, float] = field(default_factory=dict)  # what was dropped or penalised (module doc)


def select_rollouts(records: list[RolloutRecord], config: TrainConfig, current_version: int | None) -> Selection:
    """Apply the module doc's steps 1-3 (staleness skipped when current_version is None)."""
    g = config.grpo
    fresh = [r for r in records if current_version is None or not is_stale(r, current_version, config.max_staleness)]
    kept = [r for r in fresh if not is_overlong(r, config)]
    penalties = [overlong_penalty(r, g) if g.overlong == "penalty" else 0.0 for r in kept]
    rewards = [r.reward + p for r, p in zip(kept, penalties, strict=True)]
    counts: dict[str, float] = {"dropped_stale": len(records) - len(fresh), "dropped_overlong": len(fresh) - len(kept)}
    if g.overlong == "penalty":
        counts["overlong_penalised"] = sum(p < 0 for p in penalties)
        counts["overlong_penalty_mean"] = sum(penalties) / len(penalties) if penalties else 0.0
    if g.dynamic_sampling:
        members: dict[str, list[int]] = {}
        for i, r in enumerate(kept):
            members.setdefault(r.group_id, []).append(i)
        signal = {gid for gid, idx in members.items() if len(idx) > 1 and len({rewards[i] for i in idx}) > 1}
        keep = [i for i, r in enumerate(kept) if r.group_id in signal]
        counts["dynamic_dropped_groups"] = len(members) - len(signal)
        counts["dynamic_dropped_rollouts"] = len(kept) - len(keep)
        kept, rewards = [kept[i] for i in keep], [rewards[i] for i in keep]
    return Selection(kept, rewards, counts)
