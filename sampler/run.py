"""What every sampling mode shares: the config core, bounded-concurrency prompt loop, scoring, progress, summary.

Concurrency: up to `concurrency` prompts are in flight, each one request for n samples, so the
server sees up to concurrency x n sequences: enough to keep vLLM's batch full. A new request is
started as soon as one finishes (a semaphore, not fixed batches). Scoring runs in worker threads
so a slow scorer (code execution, a remote judge) does not stall the requests in flight, and a
queue push that blocks on backpressure holds its slot, which slows sampling down as intended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flywheel.sampler.config import SampleConfig
from flywheel.sampler.cursor import PromptCursor
from flywheel.sampler.prompts import PromptItem, iter_prompts
from flywheel.sampler.record import RolloutRecord
from flywheel.sampler.rewards import RewardSpec, WeightedScorer
from flywheel.server.errors import UserError

log = logging.getLogger("flywheel.sample")


def default_rewards(config: SampleConfig) -> list[RewardSpec]:
    if config.rewards:
        return config.rewards
    name = "reasoning_gym" if config.prompts.kind == "gym" else "math_verify"
    return [RewardSpec(name=name)]


def build_scorer(config: SampleConfig) -> WeightedScorer:
    try:
        return WeightedScorer(default_rewards(config))
    except ValueError as exc:  # ScorerError and pydantic errors on bad specs
        raise UserError(f"rewards: {exc}") from None


class PromptScorers:
    """The reward source of each prompt: the task's prompts by --rewards (their verifier); captured
    production prompts by --production-verifier when their request named an answer, else by
    --production-rewards (a judge endpoint: the `http` scorer), else by --rewards."""

    def __init__(self, config: SampleConfig):
        self.task = build_scorer(config)
        self.verifier = self.judge = None
        if config.prompts.kind == "capture" or config.prompts.production_fraction > 0:
            self.verifier = scorer_of(config.production_verifier, "production_verifier")
            self.judge = scorer_of(config.production_rewards, "production_rewards") or self.task

    def source(self, item: PromptItem) -> str:
        """'task', 'verifier' or 'judge': which reward scores this prompt."""
        if not item.production:
            return "task"
        return "verifier" if item.answer is not None else "judge"

    def for_item(self, item: PromptItem) -> WeightedScorer:
        return {"task": self.task, "verifier": self.verifier, "judge": self.judge}[self.source(item)]


def scorer_of(specs: list[RewardSpec] | None, what: str) -> WeightedScorer | None:
    if not specs:
        return None
    try:
        return WeightedScorer(specs)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None


def score_record(scorer: WeightedScorer, record: RolloutRecord, item: PromptItem) -> RolloutRecord:
    rewards = scorer.score_all(
        record.completion,
        item.answer,
        prompt=record.prompt,
        messages=record.messages,
        task=record.task,
        completion_token_ids=record.completion_token_ids,
        finish_reason=record.finish_reason,
    )
    record.rewards = rewards
    record.reward = record.total_reward()
    return record


async def score_group(scorer: WeightedScorer, records: list[RolloutRecord], item: PromptItem) -> list[RolloutRecord]:
    return await asyncio.to_thread(lambda: [score_record(scorer, r, item) for r in records])


@dataclass
class RunStats:
    """Counters for the progress bar and the final summary."""

    mode: str
    started: float = field(default_factory=time.monotonic)
    prompts: int = 0
    samples: int = 0
    completion_tokens: int = 0
    reward_sum: float = 0.0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, records: list[RolloutRecord]) -> None:
        self.prompts += 1
        self.samples += len(records)
        self.completion_tokens += sum(len(r.completion_token_ids) for r in records)
        self.reward_sum += sum(r.reward for r in records)

    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(1e-9, time.monotonic() - self.started)

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "prompts": self.prompts,
            "samples": self.samples,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "errors": self.errors,
            "mean_reward": round(self.reward_sum / self.samples, 4) if self.samples else None,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.tokens_per_s(), 1),
            "seconds": round(time.monotonic() - self.started, 2),
            **self.extra,
        }


async def for_each_prompt(
    items: Iterator[PromptItem],
    handle: Callable[[PromptItem], Awaitable[None]],
    config: SampleConfig,
    stats: RunStats,
    total: int | None,
) -> None:
    """Run `handle` on every prompt with at most `config.concurrency` in flight."""
    slots = asyncio.Semaphore(config.concurrency)
    bar = tqdm(total=total, desc=f"sample {stats.mode}", unit="prompt", disable=not config.progress, dynamic_ncols=True)
    tasks: set[asyncio.Task] = set()
    failure: list[BaseException] = []

    async def one(item: PromptItem) -> None:
        try:
            await handle(item)
        except UserError as exc:  # bad input (e.g. a server with no model) fails the run, not one prompt
            failure.append(exc)
        except Exception as exc:
            stats.errors += 1
            log.warning("prompt %s failed: %s: %s", item.id, type(exc).__name__, exc)
            if stats.errors > config.max_errors:
                failure.append(exc)
        finally:
            slots.release()
            bar.update(1)
            mean = stats.reward_sum / stats.samples if stats.samples else 0.0
            bar.set_postfix(
                reward=f"{mean:.3f}", tok_s=f"{stats.tokens_per_s():.0f}", kept=stats.accepted, err=stats.errors
            )

    iterator = iter(items)
    try:
        while not failure:
            await slots.acquire()
            item = await asyncio.to_thread(next, iterator, None)  # a capture stream may block
            if item is None:
                slots.release()
                break
            task = asyncio.create_task(one(item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    if bad_input := [exc for exc in failure if isinstance(exc, UserError)]:
        raise bad_input[0]
    if failure:
        raise UserError(f"{stats.errors} prompts failed, last: {type(failure[-1]).__name__}: {failure[-1]}")


async def run_prompts(
    config: SampleConfig,
    stats: RunStats,
    handle: Callable[[PromptItem], Awaitable[None]],
    closing: list[Any],
    skip: Callable[[str], bool] | None = None,
) -> None:
    """Every prompt of the configured source (but those whose key `skip` says are done) through
    `handle`; then close writers and endpoints."""
    items = iter_prompts(config.prompts, config.queue, skip) if skip else iter_prompts(config.prompts, config.queue)
    try:
        await for_each_prompt(items, handle, config, stats, config.prompts.num_prompts)
    finally:
        for thing in closing:
            if thing is not None:
                done = thing.close()
                if asyncio.iscoroutine(done):
                    await done


async def push(records: list, item: PromptItem, writer: JsonlWriter, queue: Any = None) -> None:
    """Write a prompt's kept records to JSONL and the queue (blocking under backpressure), then ack
    its capture entry."""
    writer.write([r.to_json() if isinstance(r, RolloutRecord) else r.model_dump_json() for r in records])
    if queue is not None and records:
        await asyncio.to_thread(queue.put, records)
    if item.done is not None:
        await asyncio.to_thread(item.done)


class GroupCommitter:
    """A prompt's outcome committed once, then written: the queue transaction (records, counters and
    the cursor's done mark) first, then the JSONL lines from what was committed (sampler/cursor.py)."""

    def __init__(self, writer: JsonlWriter, queue: Any, cursor: PromptCursor | None):
        self.writer, self.queue, self.cursor = writer, queue, cursor
        # one group's write + its `unwritten` clear at a time: a kill leaves at most one group
        # written but not cleared, at the file's end, where reconcile looks for it
        self._writing = asyncio.Lock()

    async def start(self, item: PromptItem) -> None:
        if self.cursor is not None:
            await asyncio.to_thread(self.cursor.start, item)

    async def commit(self, item: PromptItem, records: list[RolloutRecord], counters: dict[str, int]) -> None:
        lines = [r.to_json() for r in records]
        if self.queue is None:
            self.writer.write(lines)
            if item.done is not None:
                await asyncio.to_thread(item.done)
            return
        file_lines = lines if self.writer.path is not None else []
        mark = self.cursor.mark(item, file_lines) if self.cursor is not None else None
        await asyncio.to_thread(self.queue.put, records, counters=counters, mark=mark)
        async with self._writing:
            self.writer.write(lines)
            if self.cursor is not None and file_lines:
                await asyncio.to_thread(self.cursor.written, item)
        if self.cursor is None and item.done is not None:  # with a cursor, the capture ack was in the commit
            await asyncio.to_thread(item.done)


def finish(stats: RunStats, config: SampleConfig) -> dict[str, Any]:
    summary = stats.summary()
    line = ", ".join(f"{k}={v}" for k, v in summary.items())
    print(f"flywheel sample {stats.mode}: {line}", flush=True)
    if config.summary_path:
        config.summary_path.parent.mkdir(parents=True, exist_ok=True)
        config.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class JsonlWriter:
    """Appends whole groups of lines at once and flushes, so a crash leaves at most one partial line."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a")

    def write(self, lines: list[str]) -> None:
        if self._file is not None and lines:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
