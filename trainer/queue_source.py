"""Rollouts from the Redis queue (sampler/queue.py), trained at most once, acked only when durable.

- Each step reads until it has `batch_size` records (whole groups when grpo.group_size is set;
  records of incomplete groups wait in a buffer for their siblings). With grpo.dynamic_sampling only
  records of groups with signal count towards batch_size: the groups without are taken into the step
  (acked with it, never trained) and the step reads on (trainer/rollout_selection.py).
- `seen` holds the ids of records in a durable checkpoint (from the checkpoint's trained ids, and
  each `ack_durable` after one is written): the queue acks-and-skips their redeliveries.
- Records handed to a step but not yet in a checkpoint are `in_flight`: never acked, never trained
  again. Their deliveries are touched while the next batch is awaited, and if one comes back anyway
  (our own reclaim after a long wait) it is left pending, not acked as a duplicate: acking it then
  lost it for good when the trainer died before the next checkpoint (save_every > 1). A crash, or a
  clean stop, before the checkpoint leaves them pending: they are redelivered and retrained from the
  restored weights, which never saw them.
- Records that do not decode (wrong shape, mismatched token/logprob lengths) are dead-lettered by
  the queue itself with the reason; stale ones are dropped, counted and acked with their step.
"""

from __future__ import annotations

import time

from flywheel.sampler.queue import RolloutQueue, SeenIds
from flywheel.server.errors import UserError
from flywheel.trainer.checkpoint import TrainState
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.rollout_selection import select_rollouts
from flywheel.trainer.sources import StepData, rollout_step


class QueueSource:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.queue = RolloutQueue(config.queue, consumer=config.queue_input.consumer)
        self.seen: SeenIds | None = None
        self.buffer: dict[str, object] = {}  # record id -> Delivery, in arrival order
        self.in_flight: dict[str, object] = {}  # record id -> Delivery: trained, not yet in a durable checkpoint
        self.items: list = []  # no file dataset behind this source

    def _ready(self, state: TrainState) -> tuple[list, int]:
        """Deliveries that can be trained now (everything, or only complete groups, in arrival order) and how
        many of them count towards batch_size: all, or with dynamic sampling only those of groups with signal
        (trainer/rollout_selection.py), so the step reads on until it has batch_size of those."""
        size = self.config.grpo.group_size
        deliveries = list(self.buffer.values())
        if size <= 0:
            out = deliveries[: self.config.batch_size]
            return out, len(out)
        groups: dict[str, list] = {}
        for d in deliveries:
            groups.setdefault(d.record.group_id, []).append(d)
        out: list = []
        trainable = 0
        for members in groups.values():
            if len(members) >= size and trainable < self.config.batch_size:
                out += members
                if self.config.grpo.dynamic_sampling:
                    trainable += len(
                        select_rollouts([d.record for d in members], self.config, state.pushed_version).records
                    )
                else:
                    trainable += len(members)
        return out, trainable

    def next_step(self, step: int, state: TrainState) -> StepData:
        if self.seen is None:
            self.seen = SeenIds(ids=state.trained_ids)
        wait = self.config.queue_input
        deadline = time.monotonic() + wait.max_wait_s
        extra_acks = []
        while True:
            ready, trainable = self._ready(state)
            if trainable >= self.config.batch_size:
                break
            if time.monotonic() > deadline:
                if ready:
                    break  # train on what there is rather than stall forever
                raise UserError(f"no rollouts on stream {self.config.queue.stream!r} for {wait.max_wait_s:.0f}s")
            for d in self.queue.get(count=self.config.batch_size, block_s=wait.block_s, seen=self.seen):
                mine = self.in_flight.get(d.record.id) or self.buffer.get(d.record.id)
                if mine is not None:  # a record we hold came again
                    if d.entry_id != mine.entry_id:
                        extra_acks.append(d)  # another entry of it: acked with this step, once durable
                    continue  # the same entry (our own reclaim): it stays pending until its checkpoint
                self.buffer[d.record.id] = d
            self.queue.touch(list(self.buffer.values()) + list(self.in_flight.values()))
        for d in ready:
            del self.buffer[d.record.id]
            self.in_flight[d.record.id] = d
        data = rollout_step([d.record for d in ready], self.config, state)
        data.acks = ready + extra_acks
        return data

    def ack_durable(self, acks: list) -> None:
        """The checkpoint holding these deliveries' steps is written: ack them; their records are seen."""
        self.queue.ack(acks)
        for d in acks:
            if self.in_flight.pop(d.record.id, None) is not None and self.seen is not None:
                self.seen.add(d.record.id)

    def keep_alive(self, acks: list) -> None:
        if acks or self.buffer:
            self.queue.touch(list(acks) + list(self.buffer.values()))

    def close(self) -> None:
        self.queue.close()
