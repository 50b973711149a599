"""The sampler's durable prompt cursor: which prompts of a source are done, which are in flight.

A restarted sampler (killed, Ctrl-C'd, restarted by `flywheel up` or compose) resumes after the
done prompts and redoes the ones that were in flight: no prompt is lost, repeated or skipped.
It lives in Redis next to the rollout stream (keys owned here; `<source>` is prompts.source_name):

    <stream>:cursor:<source>:done       SET   keys of the prompts whose outcome is committed
    <stream>:cursor:<source>:inflight   HASH  key -> unix time the prompt was started (not yet committed)
    <stream>:cursor:<source>:unwritten  HASH  key -> the prompt's records as JSON lines: committed,
                                              not yet known to be in the JSONL file

Commit (RolloutQueue.put with this cursor's mark): one MULTI/EXEC holds the prompt's records,
its counters, SADD done, HDEL inflight and HSET unwritten. Only then is the JSONL file appended
(from those committed records), then `unwritten` is cleared. A kill anywhere leaves either all
of a prompt's commit or none of it; `reconcile` on start appends to the file whatever committed
records it is missing (and cuts a torn last line), so the file and the stream always agree.

One sampler per queue and prompt source at a time: a second one started on the same cursor would
clear the first's in-flight marks and sample the same prompts. Power loss is not covered: the JSONL
is flushed, not fsynced, per group (a SIGKILL loses nothing the OS already has).

A capture source needs no done set: its prompt's done mark is the capture entry's XACK, in the
same transaction (an acked entry is never delivered again; an unacked one is reclaimed and redone).
A mixed source (a task's prompts plus captured ones, prompts.mixed_prompts) marks each prompt by
its own kind: the task's in `done`, the captured ones by their ack.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flywheel.sampler.config import PromptSourceConfig
from flywheel.sampler.prompts import PromptItem, source_name
from flywheel.sampler.queue import PromptQueue, RolloutQueue

log = logging.getLogger("flywheel.sample")


class SetMark:
    """A sequence source's done mark: the key joins `done`, leaves `inflight`; its lines wait in `unwritten`."""

    def __init__(self, cursor: PromptCursor, key: str, lines: list[str]):
        self.cursor, self.key, self.lines = cursor, key, lines

    def add(self, pipe: Any) -> None:
        c = self.cursor
        pipe.sadd(c.done_key, self.key)
        pipe.hdel(c.inflight_key, self.key)
        if self.lines:
            pipe.hset(c.unwritten_key, self.key, json.dumps(self.lines))

    def applied(self) -> bool:
        return bool(self.cursor.redis.sismember(self.cursor.done_key, self.key))


class AckMark(SetMark):
    """A capture prompt's done mark: the XACK of its capture entry (plus the lines in `unwritten`)."""

    def add(self, pipe: Any) -> None:
        self.cursor.captures.ack_into(pipe, [self.key])
        if self.lines:
            pipe.hset(self.cursor.unwritten_key, self.key, json.dumps(self.lines))

    def applied(self) -> bool:
        return not self.cursor.captures.is_pending(self.key)


class PromptCursor:
    """One prompt source's progress, shared by every run of the sampler on the same queue and source."""

    def __init__(self, queue: RolloutQueue, source: PromptSourceConfig):
        self.queue, self.redis = queue, queue.redis
        self.source = source_name(source)
        prefix = f"{queue.config.stream}:cursor:{self.source}"
        self.done_key, self.inflight_key, self.unwritten_key = (
            f"{prefix}:{k}" for k in ("done", "inflight", "unwritten")
        )
        self.captures = (
            PromptQueue(queue.config, stream=source.capture_stream, group=source.capture_group)
            if source.kind == "capture" or source.production_fraction > 0
            else None
        )
        self.done: set[str] = set()

    def resume(self) -> dict[str, int]:
        """Load the done keys (to skip) and forget the in-flight marks (those prompts are redone)."""
        self.done = {k.decode() for k in self.queue.call("cursor", lambda: self.redis.smembers(self.done_key))}
        in_flight = self.queue.call("cursor", lambda: self.redis.hkeys(self.inflight_key))
        if in_flight:
            self.queue.call("cursor", lambda: self.redis.delete(self.inflight_key))
        if self.done or in_flight:
            log.info(
                "cursor %s: resuming after %d done prompts; redoing %d that were in flight",
                self.source,
                len(self.done),
                len(in_flight),
            )
        return {"resumed_done": len(self.done), "redone_in_flight": len(in_flight)}

    def skip(self, key: str) -> bool:
        return key in self.done

    def start(self, item: PromptItem) -> None:
        if not item.production:  # a capture in flight is its pending entry already
            self.queue.call("cursor", lambda: self.redis.hset(self.inflight_key, item.key, time.time()))

    def mark(self, item: PromptItem, lines: list[str]) -> SetMark:
        """The done mark of `item` for its commit, carrying the JSON lines of its kept records."""
        return (AckMark if item.production else SetMark)(self, item.key, lines)

    def written(self, item: PromptItem) -> None:
        """The item's committed lines are in the JSONL file (or there is no file)."""
        self.queue.call("cursor", lambda: self.redis.hdel(self.unwritten_key, item.key))

    def reconcile(self, path: Path | None) -> int:
        """Append to `path` the committed lines it lacks (a kill between commit and write); returns how many."""
        pending = self.queue.call("cursor", lambda: self.redis.hgetall(self.unwritten_key))
        if not pending:
            return 0
        groups = {k.decode(): json.loads(v) for k, v in pending.items()}
        appended = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            cut_torn_tail(path)
            present = tail_ids(path, sum(len(lines) for lines in groups.values()))
            missing = [line for lines in groups.values() for line in lines if json.loads(line)["id"] not in present]
            if missing:
                with path.open("a") as fh:
                    fh.write("".join(line + "\n" for line in missing))
                    fh.flush()
                    os.fsync(fh.fileno())
            appended = len(missing)
            if appended:
                log.warning("%s: appended %d committed records the file lacked (killed before writing)", path, appended)
        self.queue.call("cursor", lambda: self.redis.hdel(self.unwritten_key, *groups))
        return appended


def cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut by a kill): its record is re-appended whole."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        end, step = size, 1 << 16
        while end > 0:  # find the last newline, reading backwards
            start = max(0, end - step)
            fh.seek(start)
            at = fh.read(end - start).rfind(b"\n")
            if at >= 0:
                fh.truncate(start + at + 1)
                return
            end = start
        fh.truncate(0)


def tail_ids(path: Path, lines: int) -> set[str]:
    """Record ids of the last `lines` lines of a JSONL file (where an interrupted write can be)."""
    if not path.is_file() or lines <= 0:
        return set()
    with path.open("rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        data, start, step = b"", end, 1 << 16
        while start > 0 and data.count(b"\n") <= lines:
            start = max(0, start - step)
            fh.seek(start)
            data = fh.read(end - start)
    out = set()
    for line in data.splitlines()[-lines:]:
        try:
            out.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            continue  # the first, partial line of the window
    return out
