"""Rollouts from the Redis queue (sampler/queue.py), trained at most once, acked only when durable.

- Each step reads until it has `batch_size` records (whole groups when grpo.group_size is set;
  records of incomplete groups wait in a buffer for their siblings).
- `seen` (from the checkpoint's trained ids) makes the queue ack-and-skip redeliveries of records
  already trained; records of the current run are added as they are handed to a step.
- Deliveries are acked by the recipe only after the checkpoint holding their step is written
  (`ack_durable`); until then `keep_alive` touches them so nobody reclaims them. A crash before
  the checkpoint leaves them pending: they are redelivered and retrained from the restored weights.
- Records that do not decode (wrong shape, mismatched token/logprob lengths) are dead-lettered by
  the queue itself with the reason; stale ones are dropped, counted and acked with their step.
"""

from __future__ import annotations

import time

from sampler.queue import RolloutQueue, SeenIds
from server.errors import UserError
from trainer.checkpoint import TrainState
from trainer.config import TrainConfig
from trainer.sources import StepData, rollout_step


class QueueSource:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.queue = RolloutQueue(config.queue, consumer=config.queue_input.consumer)
        self.seen: SeenIds | None = None
        self.buffer: dict[str, object] = {}  # record id -> Delivery, in arrival order
        self.items: list = []  # no file dataset behind this source

    def _ready(self) -> list:
        """Deliveries that can be trained now: everything, or only complete groups (in arrival order)."""
        size = self.config.grpo.group_size
        deliveries = list(self.buffer.values())
        if size <= 0:
            return deliveries[: self.config.batch_size]
        groups: dict[str, list] = {}
        for d in deliveries:
            groups.setdefault(d.record.group_id, []).append(d)
        out: list = []
        for members in groups.values():
            if len(members) >= size and len(out) < self.config.batch_size:
                out += members
        return out

    def next_step(self, step: int, state: TrainState) -> StepData:
        if self.seen is None:
            self.seen = SeenIds(ids=state.trained_ids)
        wait = self.config.queue_input
        deadline = time.monotonic() + wait.max_wait_s
        extra_acks = []
        while len(ready := self._ready()) < self.config.batch_size:
            if time.monotonic() > deadline:
                if ready:
                    break  # train on what there is rather than stall forever
                raise UserError(f"no rollouts on stream {self.config.queue.stream!r} "
                                 f"for {wait.max_wait_s:.0f}s")
            for d in self.queue.get(count=self.config.batch_size, block_s=wait.block_s, seen=self.seen):
                if d.record.id in self.buffer:  # the same record delivered again while buffered
                    extra_acks.append(d)
                    continue
                self.buffer[d.record.id] = d
            self.queue.touch(list(self.buffer.values()))
        for d in ready:
            del self.buffer[d.record.id]
            self.seen.add(d.record.id)
        data = rollout_step([d.record for d in ready], self.config, state)
        data.acks = ready + extra_acks
        return data

    def ack_durable(self, acks: list) -> None:
        self.queue.ack(acks)

    def keep_alive(self, acks: list) -> None:
        if acks or self.buffer:
            self.queue.touch(list(acks) + list(self.buffer.values()))

    def close(self) -> None:
        self.queue.close()
