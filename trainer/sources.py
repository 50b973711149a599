"""Where each optimizer step's samples come from: files (replayable by step number) or the rollout queue.

A source answers `next_step(step, state) -> StepData`. File sources are pure functions of the
step number and seed (trainer/data.take_step), so a resumed run replays exactly the batches it
would have seen. The queue source (trainer/queue_source.py) reads live records and acks them
only once a checkpoint holding their step is on disk (`ack_durable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flywheel.sampler.prompts import is_production
from flywheel.sampler.record import RolloutRecord
from flywheel.server.errors import UserError
from flywheel.trainer.checkpoint import TrainState
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.data import (
    DataError,
    dpo_pair,
    load_dpo,
    load_rollouts,
    load_sft,
    load_text,
    rollout_sample,
    take_step,
)
from flywheel.trainer.losses import group_advantages
from flywheel.trainer.rollout_selection import is_overlong, is_stale, select_rollouts


@dataclass
class StepData:
    items: list  # Sample (cpt/sft/grpo) or PreferencePair (dpo)
    indices: list[int] = field(default_factory=list)  # positions in the file dataset (DPO reference rows)
    record_ids: list[str] = field(default_factory=list)  # queue records this step used (idempotency)
    acks: list = field(default_factory=list)  # queue deliveries to ack once this step is durable
    info: dict = field(default_factory=dict)  # per-step metrics of the data (reward_mean, dropped_stale, ...)


def rollout_step(records: list[RolloutRecord], config: TrainConfig, state: TrainState) -> StepData:
    """Select the trainable records (trainer/rollout_selection.py), set group-normalised advantages, build samples."""
    sel = select_rollouts(records, config, state.pushed_version)
    info: dict = dict(sel.counts)
    if not sel.records:
        return StepData([], record_ids=[r.id for r in records], info=info)
    adv, zero = group_advantages(
        torch.tensor(sel.rewards), [r.group_id for r in sel.records], scale_by_std=config.grpo.scale_by_std
    )
    # how off-policy this step is: versions behind the last push, of the records actually trained
    staleness = [state.pushed_version - r.policy_version for r in sel.records]
    samples = [
        rollout_sample(r, float(a), config.max_seq_len, lag)
        for r, a, lag in zip(sel.records, adv, staleness, strict=True)
    ]
    return StepData(
        samples,
        record_ids=[r.id for r in records],
        info={
            "reward_mean": sum(r.reward for r in sel.records) / len(sel.records),
            **info,
            "zero_variance_groups": zero,
            "completions": len(sel.records),
            # of them, completions of captured production prompts (the loop report's "trained")
            "production_completions": sum(is_production(r.group_id) for r in sel.records),
            "staleness_max": max(staleness),
            "staleness_mean": sum(staleness) / len(staleness),
        },
    )


def feedback_items(config: TrainConfig, tokenizer) -> list:
    """The user feedback in config.from_feedback's Redis: DPO pairs (dpo) or rewarded rollouts (grpo)."""
    from flywheel.sampler.feedback import feedback_pairs, feedback_rollouts, rated

    try:
        items = rated(config.from_feedback, config.feedback_stream)
    except Exception as exc:  # redis raises several unrelated types (connection, auth, wrong type)
        raise UserError(f"cannot read feedback from {config.from_feedback}: {type(exc).__name__}: {exc}") from None
    if config.objective == "dpo":
        pairs = [dpo_pair(p, tokenizer, config.max_seq_len, f"feedback {p['id']}") for p in feedback_pairs(items)]
        if not pairs:
            raise DataError(
                f"{len(items)} rating(s) in {config.from_feedback} make no preference pair "
                "(two answers of one prompt rated differently, or a preferred answer)"
            )
        return pairs
    built = feedback_rollouts(items)
    if not built.records:
        raise DataError(
            f"{len(items)} rating(s) in {config.from_feedback} give no trainable rollout"
            + (f"; first skipped: {built.skipped[0]}" if built.skipped else "")
        )
    return built.records


class FileSource:
    """A fixed dataset from files, batch_size items per step, reshuffled every epoch."""

    def __init__(self, config: TrainConfig, tokenizer):
        self.config = config
        self.items: list = []
        for path in config.data:
            if config.objective == "sft":
                self.items += load_sft(path, tokenizer, config.max_seq_len)
            elif config.objective == "cpt":
                self.items += load_text(path, tokenizer, config.max_seq_len)
            elif config.objective == "dpo":
                self.items += load_dpo(path, tokenizer, config.max_seq_len)
            else:
                self.items += load_rollouts(path)
        if config.from_feedback is not None:
            self.items += feedback_items(config, tokenizer)
        if not self.items:
            raise DataError(f"empty dataset: {', '.join(map(str, config.data)) or 'no feedback'}")
        if config.objective == "grpo":
            # a file holds whole groups: select and normalise each over all of its members once, then shuffle
            # freely. Dynamic sampling takes the groups without signal out of the pool, so every step is full.
            sel = select_rollouts(self.items, config, current_version=None)
            self.file_counts = {k: v for k, v in sel.counts.items() if k.startswith("dynamic_")}
            if config.grpo.dynamic_sampling:
                if not sel.records:
                    raise DataError("dynamic sampling left no group with unequal rewards in the training files")
                signal = {r.group_id for r in sel.records}  # their overlong members stay: dropped per step
                self.items = [r for r in self.items if r.group_id in signal]
            self.advantages = torch.zeros(len(self.items))
            self.penalties = torch.zeros(len(self.items))  # the overlong penalty in each item's reward
            self.zero_variance_groups = 0
            if sel.records:
                adv, self.zero_variance_groups = group_advantages(
                    torch.tensor(sel.rewards),
                    [r.group_id for r in sel.records],
                    scale_by_std=config.grpo.scale_by_std,
                )
                position = {id(r): i for i, r in enumerate(self.items)}
                at = [position[id(r)] for r in sel.records]
                self.advantages[at] = adv
                self.penalties[at] = torch.tensor([s - r.reward for r, s in zip(sel.records, sel.rewards, strict=True)])
            self.overlong = [is_overlong(r, config) for r in self.items]

    def next_step(self, step: int, state: TrainState) -> StepData:
        indices = take_step(len(self.items), step, self.config.batch_size, self.config.seed)
        chosen = [self.items[i] for i in indices]
        if self.config.objective == "grpo":
            fresh = [i for i in indices if not is_stale(self.items[i], state.pushed_version, self.config.max_staleness)]
            keep = [i for i in fresh if not self.overlong[i]]
            samples = [
                rollout_sample(
                    self.items[i],
                    float(self.advantages[i]),
                    self.config.max_seq_len,
                    state.pushed_version - self.items[i].policy_version,
                )
                for i in keep
            ]
            rewards = [self.items[i].reward for i in keep]
            info = {
                "dropped_stale": len(indices) - len(fresh),
                "dropped_overlong": len(fresh) - len(keep),
                "completions": len(keep),
                "zero_variance_groups": self.zero_variance_groups,
                **self.file_counts,  # over the whole file: the groups dynamic sampling took out of the pool
            }
            if self.config.grpo.overlong == "penalty" and keep:
                info["overlong_penalised"] = int((self.penalties[keep] < 0).sum())
                info["overlong_penalty_mean"] = float(self.penalties[keep].mean())
            if rewards:
                info["reward_mean"] = sum(rewards) / len(rewards)
            return StepData(samples, indices=keep, info=info)
        return StepData(chosen, indices=indices)

    def ack_durable(self, acks: list) -> None:
        pass

    def close(self) -> None:
        pass

    def keep_alive(self, acks: list) -> None:
        pass
