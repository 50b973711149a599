"""The rollout queue: Redis Streams with consumer groups, at-least-once delivery.

Producer (the sampler)                     Consumer (the trainer)
    queue.put(records, mark=...)               for d in queue.get(count=8): ... use d.record ...
      waits while backlog >= max_backlog       queue.ack(batch)   <- only after the optimizer step
      MULTI; XADD <stream> * r <msgpack> ...;  (crash before ack: the entry stays pending)
      HINCRBY stats ...; <done mark>; EXEC

- A put is one MULTI/EXEC: a prompt's whole group, its counters and its done mark in the
  sampler's prompt cursor (sampler/cursor.py) land together or not at all, so a killed sampler
  leaves either the committed prompt (records + mark) or nothing of it, never half a group.

- Backlog = entries produced but not yet acked by the group (pending + never delivered). The
  producer blocks while it is at `max_backlog`, so the stream's unacked part stays bounded.
  Acked entries are trimmed with XTRIM MINID below the oldest unacked entry of every group:
  trimming never drops unacked work (a plain MAXLEN could drop an old pending entry).
- Recovery: `get` first XAUTOCLAIMs entries pending longer than `claim_idle_s` (a dead consumer's
  work), then reads new ones. A slow but alive consumer calls `touch` to keep its entries.
- Dead letters: an entry delivered more than `max_deliveries` times without an ack, an entry
  that does not decode (garbage bytes, unknown schema version), or one `nack`ed on its last
  delivery goes to `<stream>:dead` with the reason, and is acked on the main stream. The
  consumer logs it and carries on; it never raises for a bad entry.
- Idempotency: delivery is at least once (a reclaimed entry, or a retried XADD whose reply was
  lost, can arrive twice). `SeenIds` holds the record ids already used; the trainer keeps it in
  its checkpoint and passes it to `get(seen=...)`, which acks and skips repeats.
- Redis down or restarted: every call retries with exponential backoff (logged, counted in
  `outages`); records a producer holds stay in its memory until XADD succeeds. A group lost with
  a restarted, non-persistent Redis is re-created.
- Stats live in Redis (hash `<stream>:stats`, plus live group info): `stats()` works from any process.
  Producers add their own counters with `count(...)`: the GRPO sampler counts the groups it drops
  as uniform (`dropped_uniform_groups`, `dropped_uniform_rollouts`: scored, never put).

Entry format: field `r` = the payload bytes (RolloutRecord.to_bytes for rollouts; the capture
format of server/capture.py for the prompts stream).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from flywheel.sampler.config import QueueConfig
from flywheel.sampler.record import RecordError, RolloutRecord

log = logging.getLogger("flywheel.queue")
FIELD = b"r"
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionResetError)


class QueueFull(TimeoutError):
    """put(timeout_s=...) waited that long and the backlog stayed at the bound."""


class RedisUnavailable(ConnectionError):
    """Redis stayed unreachable for longer than retry_for_s."""


@dataclass
class Delivery:
    """One entry handed to a consumer: ack it (or nack it) when done."""

    entry_id: str
    record: Any
    deliveries: int


class SeenIds:
    """Ids already used (trained on), oldest forgotten beyond `capacity`; save with state_dict()."""

    def __init__(self, capacity: int = 1_000_000, ids: Iterable[str] = ()):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for i in ids:
            self.add(i)

    def add(self, record_id: str) -> None:
        self._ids[record_id] = None
        self._ids.move_to_end(record_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "ids": list(self._ids)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SeenIds:
        return cls(state.get("capacity", 1_000_000), state.get("ids", []))


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DoneMark(Protocol):
    """What a prompt cursor adds to a rollout commit (sampler/cursor.py): the prompt's done mark."""

    def add(self, pipe: Any) -> None:
        """Queue the mark's commands on the commit's MULTI."""

    def applied(self) -> bool:
        """Whether the mark is already in Redis (so an earlier attempt of this commit landed)."""


class StreamQueue:
    """A Redis stream of payloads with one consumer group. Subclasses say how payloads are coded."""

    def encode(self, item: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError

    def item_id(self, item: Any) -> str | None:
        """The idempotency key of a decoded payload (None: no deduplication)."""
        return getattr(item, "id", None)

    def __init__(self, config: QueueConfig | None = None, *, consumer: str | None = None, **overrides: Any):
        self.config = (config or QueueConfig()).model_copy(update=overrides)
        c = self.config
        self.redis = redis.Redis.from_url(c.url, socket_connect_timeout=2.0, socket_timeout=max(10.0, c.claim_idle_s))
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.dead_stream = f"{c.stream}:dead"
        self.stats_key = f"{c.stream}:stats"
        self.failures_key = f"{c.stream}:failures"
        self.outages = 0  # times Redis was found unreachable by this process
        self._claim_cursor = "0-0"
        self._puts = 0
        self._group_ready = False

    # ------------------------------------------------------------ plumbing
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one Redis operation, retrying through outages and a lost group."""
        delay, down_since = 0.05, None
        while True:
            try:
                if not self._group_ready:
                    self._create_group()
                result = fn()
                if down_since is not None:
                    log.warning("redis back after %.1fs (%s)", time.monotonic() - down_since, what)
                return result
            except _TRANSIENT as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    self.outages += 1
                    log.warning("redis unreachable during %s: %s; retrying with backoff", what, exc)
                if self.config.retry_for_s is not None and time.monotonic() - down_since > self.config.retry_for_s:
                    raise RedisUnavailable(
                        f"redis at {self.config.url} unreachable for {self.config.retry_for_s}s ({what}): {exc}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                    raise
                log.warning(
                    "stream %s or group %s missing (redis restarted?); re-creating it",
                    self.config.stream,
                    self.config.group,
                )
                self._group_ready = False

    def _create_group(self) -> None:
        try:
            self.redis.xgroup_create(self.config.stream, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _count(self, pipe: Any, key: str, n: float = 1) -> None:
        if isinstance(n, float):
            pipe.hincrbyfloat(self.stats_key, key, n)
        else:
            pipe.hincrby(self.stats_key, key, n)

    # ------------------------------------------------------------ producer
    def put(
        self,
        items: Any | Iterable[Any],
        timeout_s: float | None = None,
        *,
        counters: dict[str, int | float] | None = None,
        mark: DoneMark | None = None,
    ) -> list[str]:
        """Append items (one or a list) in one MULTI/EXEC, with `counters` added to the stats and
        `mark`'s commands (a prompt cursor's done mark): all of it lands or none. Blocks while the
        backlog is at max_backlog. Returns entry ids ([] when `mark` says an earlier attempt landed)."""
        batch = list(items) if isinstance(items, list | tuple) else [items]
        payloads = [self.encode(item) for item in batch]  # encode first: a bad record fails here, not half-sent
        if payloads:
            self.wait_for_room(len(payloads), timeout_s)

        attempts = 0

        def send() -> list[str]:
            nonlocal attempts
            attempts += 1
            # A retry after an outage may follow an EXEC that ran but whose reply was lost: the mark
            # is part of the transaction, so finding it applied means the whole commit landed.
            if attempts > 1 and mark is not None and mark.applied():
                return []
            pipe = self.redis.pipeline(transaction=True)
            for data in payloads:
                pipe.xadd(self.config.stream, {FIELD: data})
            if payloads:
                self._count(pipe, "produced", len(payloads))
            for key, n in (counters or {}).items():
                self._count(pipe, key, n)
            if mark is not None:
                mark.add(pipe)
            return [_s(i) for i in pipe.execute()[: len(payloads)]]

        ids = self._call("put", send)
        self._puts += 1
        if self._puts % self.config.trim_every == 0:
            self.trim()
        return ids

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` (Redis commands on self.redis) with this queue's retries through outages."""
        return self._call(what, fn)

    def wait_for_room(self, n: int = 1, timeout_s: float | None = None) -> None:
        """Backpressure: sleep until `n` more entries fit under max_backlog (a lone oversize batch waits for empty)."""
        start, delay, waited = time.monotonic(), 0.01, False
        while True:
            backlog = self.backlog()
            if backlog == 0 or backlog + n <= self.config.max_backlog:
                break
            if not waited:
                waited = True
                log.info("backpressure: backlog %d >= %d, producer waiting", backlog, self.config.max_backlog)
                self._call("stats", lambda: self.redis.hincrby(self.stats_key, "backpressure_waits", 1))
            if timeout_s is not None and time.monotonic() - start >= timeout_s:
                raise QueueFull(f"backlog stayed at {backlog} (bound {self.config.max_backlog}) for {timeout_s}s")
            self.trim()
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        if waited:
            seconds = time.monotonic() - start
            self._call("stats", lambda: self.redis.hincrbyfloat(self.stats_key, "backpressure_s", seconds))

    def _group_info(self) -> list[dict[str, Any]]:
        groups = self._call("xinfo", lambda: self.redis.xinfo_groups(self.config.stream))
        return [{_s(k): v for k, v in g.items()} for g in groups]

    def _undelivered(self, group: dict[str, Any]) -> int:
        if group.get("lag") is not None:
            return int(group["lag"])
        # Redis cannot compute the lag after deletions: count what lies after last-delivered-id.
        after = "(" + _s(group["last-delivered-id"])
        return len(
            self._call(
                "xrange", lambda: self.redis.xrange(self.config.stream, after, "+", count=self.config.max_backlog + 1)
            )
        )

    def backlog(self) -> int:
        """Entries not yet acked by our group: pending (delivered, unacked) + never delivered."""
        for g in self._group_info():
            if _s(g["name"]) == self.config.group:
                return int(g["pending"]) + self._undelivered(g)
        return 0

    def trim(self) -> int:
        """Drop entries that every group has acked (XTRIM MINID below the oldest unacked entry)."""
        bounds = []
        for g in self._group_info():
            pending = self._call("xpending", lambda: self.redis.xpending(self.config.stream, _s(g["name"])))
            if pending["pending"]:
                bounds.append(_s(pending["min"]))
            else:
                bounds.append(_next_id(_s(g["last-delivered-id"])))
        if not bounds:
            return 0
        min_id = min(bounds, key=_id_key)
        # '~' trims only whole radix-tree nodes below min_id: it may keep more, never less.
        return int(self._call("trim", lambda: self.redis.xtrim(self.config.stream, minid=min_id, approximate=True)))

    # ------------------------------------------------------------ consumer
    def get(self, count: int = 1, block_s: float = 1.0, seen: SeenIds | None = None) -> list[Delivery]:
        """Up to `count` deliveries: reclaimed stale entries first, then new ones (waits up to block_s)."""
        out = self._reclaim(count)
        if len(out) < count:
            # Block for new entries only when nothing was reclaimed: reclaimed work is returned at once.
            block = None if out or block_s <= 0 else max(1, int(block_s * 1000))

            def read() -> Any:
                return self.redis.xreadgroup(
                    self.config.group, self.consumer, {self.config.stream: ">"}, count=count - len(out), block=block
                )

            for _, entries in self._call("get", read) or []:
                for entry_id, fields in entries:
                    out.append((_s(entry_id), fields, 1))
        deliveries = []
        for entry_id, fields, times in out:
            delivery = self._decode_entry(entry_id, fields, times)
            if delivery is None:
                continue
            key = self.item_id(delivery.record)
            if seen is not None and key is not None and key in seen:
                log.info("skipping %s (record %s already used): acked without use", entry_id, key)
                self.ack([entry_id], counter="duplicates_skipped")
                continue
            deliveries.append(delivery)
        return deliveries

    def _reclaim(self, count: int) -> list[tuple[str, dict, int]]:
        idle_ms = int(self.config.claim_idle_s * 1000)

        def claim() -> Any:
            return self.redis.xautoclaim(
                self.config.stream, self.config.group, self.consumer, idle_ms, start_id=self._claim_cursor, count=count
            )

        reply = self._call("reclaim", claim)
        self._claim_cursor = _s(reply[0])
        claimed = [(_s(i), f) for i, f in reply[1] if f is not None]
        out = []
        for entry_id, fields in claimed:
            info = self._call(
                "xpending",
                lambda: self.redis.xpending_range(
                    self.config.stream, self.config.group, min=entry_id, max=entry_id, count=1
                ),
            )
            times = int(info[0]["times_delivered"]) if info else self.config.max_deliveries + 1
            if times > self.config.max_deliveries:
                reason = self._call("failures", lambda: self.redis.hget(self.failures_key, entry_id))
                why = f"delivered {times - 1} times without ack" + (f"; last failure: {_s(reason)}" if reason else "")
                self.dead_letter(entry_id, fields, why, times - 1)
                continue
            log.info(
                "reclaimed %s (delivery %d) from a consumer idle > %.0fs", entry_id, times, self.config.claim_idle_s
            )
            self._call("stats", lambda: self.redis.hincrby(self.stats_key, "reclaimed", 1))
            out.append((entry_id, fields, times))
        return out

    def _decode_entry(self, entry_id: str, fields: dict, times: int) -> Delivery | None:
        data = fields.get(FIELD, fields.get(FIELD.decode()))
        try:
            if data is None:
                raise RecordError(f"entry has no field {FIELD.decode()!r} (fields: {sorted(_s(k) for k in fields)})")
            return Delivery(entry_id, self.decode(data), times)
        except (RecordError, ValueError, TypeError) as exc:
            self.dead_letter(entry_id, fields, f"undecodable: {exc}", times)
            return None

    def ack(self, deliveries: Iterable[Delivery | str], counter: str = "acked") -> int:
        """Acknowledge used entries (call only once their effect is durable)."""
        ids = [d.entry_id if isinstance(d, Delivery) else d for d in deliveries]
        if not ids:
            return 0

        def send() -> int:
            pipe = self.redis.pipeline(transaction=False)
            self.ack_into(pipe, ids, counter)
            return int(pipe.execute()[0])

        return self._call("ack", send)

    def ack_into(self, pipe: Any, ids: list[str], counter: str = "acked") -> None:
        """Queue the commands of an ack on `pipe` (to ack inside another transaction, e.g. a rollout commit)."""
        pipe.xack(self.config.stream, self.config.group, *ids)
        pipe.hdel(self.failures_key, *ids)
        self._count(pipe, counter, len(ids))

    def is_pending(self, entry_id: str) -> bool:
        """Whether the group still holds this entry unacked."""
        rows = self._call(
            "xpending",
            lambda: self.redis.xpending_range(
                self.config.stream, self.config.group, min=entry_id, max=entry_id, count=1
            ),
        )
        return bool(rows)

    def nack(self, delivery: Delivery, reason: str) -> None:
        """The consumer failed on this entry: dead-letter it on its last delivery, else make it reclaimable now."""
        if delivery.deliveries >= self.config.max_deliveries:
            fields = self._call(
                "xrange", lambda: self.redis.xrange(self.config.stream, delivery.entry_id, delivery.entry_id)
            )
            raw = fields[0][1] if fields else {}
            self.dead_letter(
                delivery.entry_id,
                raw,
                f"failed {delivery.deliveries} times; last failure: {reason}",
                delivery.deliveries,
            )
            return

        def send() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.failures_key, delivery.entry_id, reason)
            # Back-date the entry's idle time so the next XAUTOCLAIM (any consumer) takes it.
            pipe.xclaim(
                self.config.stream,
                self.config.group,
                self.consumer,
                0,
                [delivery.entry_id],
                idle=int(self.config.claim_idle_s * 1000) + 1,
                justid=True,
            )
            self._count(pipe, "nacked")
            pipe.execute()

        self._call("nack", send)

    def touch(self, deliveries: Iterable[Delivery]) -> None:
        """Reset the idle time of entries still being worked on, so nobody reclaims them."""
        ids = [d.entry_id for d in deliveries]
        if ids:
            self._call(
                "touch",
                lambda: self.redis.xclaim(self.config.stream, self.config.group, self.consumer, 0, ids, justid=True),
            )

    def dead_letter(self, entry_id: str, fields: dict, reason: str, deliveries: int) -> None:
        log.warning("dead-lettering %s from %s: %s", entry_id, self.config.stream, reason)
        data = fields.get(FIELD, fields.get(FIELD.decode(), b""))

        def send() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(
                self.dead_stream,
                {
                    "entry_id": entry_id,
                    "stream": self.config.stream,
                    "reason": reason,
                    "deliveries": deliveries,
                    "at": time.time(),
                    FIELD: data,
                },
            )
            pipe.xack(self.config.stream, self.config.group, entry_id)
            pipe.hdel(self.failures_key, entry_id)
            self._count(pipe, "dead_lettered")
            pipe.execute()

        self._call("dead_letter", send)

    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The oldest `count` dead letters: entry_id, reason, deliveries, at, r (raw payload bytes)."""
        rows = self._call("xrange", lambda: self.redis.xrange(self.dead_stream, count=count))
        out = []
        for _, fields in rows:
            row = {_s(k): v for k, v in fields.items()}
            out.append({k: (v if k == FIELD.decode() else _s(v)) for k, v in row.items()})
        return out

    def iter(self, count: int = 8, block_s: float = 1.0, seen: SeenIds | None = None) -> Iterator[Delivery]:
        """Deliveries forever (caller acks)."""
        while True:
            yield from self.get(count, block_s, seen)

    # ------------------------------------------------------------ stats
    def count(self, **counters: int | float) -> None:
        """Add to counters of the stats hash: a producer's own events (e.g. groups it dropped before put)."""
        if not counters:
            return

        def send() -> None:
            pipe = self.redis.pipeline(transaction=True)  # all or none: counters that belong together stay consistent
            for key, n in counters.items():
                self._count(pipe, key, n)
            pipe.execute()

        self._call("stats", send)

    def stats(self) -> dict[str, Any]:
        """Counters (produced, acked, dead_lettered, reclaimed, ...) and live state (pending, lag, backlog, length)."""
        counters = self._call("stats", lambda: self.redis.hgetall(self.stats_key))
        out: dict[str, Any] = {
            k: 0
            for k in (
                "produced",
                "acked",
                "dead_lettered",
                "reclaimed",
                "nacked",
                "duplicates_skipped",
                "backpressure_waits",
                "dropped_uniform_groups",
                "dropped_uniform_rollouts",
            )
        }
        for k, v in counters.items():
            value = float(v)
            out[_s(k)] = int(value) if value.is_integer() else value
        out.update(pending=0, lag=0, consumers=0)
        for g in self._group_info():
            if _s(g["name"]) == self.config.group:
                out.update(pending=int(g["pending"]), lag=self._undelivered(g), consumers=int(g["consumers"]))
        out["backlog"] = out["pending"] + out["lag"]
        out["length"] = int(self._call("xlen", lambda: self.redis.xlen(self.config.stream)))
        out["dead_letter_length"] = int(self._call("xlen", lambda: self.redis.xlen(self.dead_stream)))
        return out

    def close(self) -> None:
        self.redis.close()


class RolloutQueue(StreamQueue):
    """The rollouts stream: payloads are RolloutRecords (msgpack, schema-checked)."""

    def encode(self, item: RolloutRecord) -> bytes:
        return item.to_bytes()

    def decode(self, data: bytes) -> RolloutRecord:
        return RolloutRecord.from_bytes(data)


class PromptQueue(StreamQueue):
    """The production capture stream (`prompts`): payloads in server/capture.py's format."""

    def __init__(self, config: QueueConfig | None = None, **overrides: Any):
        overrides = {"stream": "prompts", "group": "sampler", **overrides}
        super().__init__(config, **overrides)

    def encode(self, item: Any) -> bytes:
        from flywheel.server.capture import CapturedRequest

        return CapturedRequest.model_validate(item).to_bytes()

    def decode(self, data: bytes) -> Any:
        from flywheel.server.capture import CapturedRequest, CaptureFormatError

        try:
            return CapturedRequest.from_bytes(data)
        except CaptureFormatError as exc:
            raise RecordError(str(exc)) from None
