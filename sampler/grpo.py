"""`flywheel sample grpo`: n samples per prompt, scored, pushed to the rollout queue as one group.

A group is pushed whole (one XADD pipeline), so the learner sees every sample of a prompt together
and can compute group-relative advantages. Groups whose rewards are all equal carry no GRPO signal
(zero advantage for every sample); they are dropped by default, counted as `skipped` in the summary
and, with the queue on, as `dropped_uniform_groups` / `dropped_uniform_rollouts` in its Redis stats
(so `flywheel up` and anyone reading the stats see how much sampling carried no signal).

Each prompt's reward source is its own (run.PromptScorers): a captured production prompt is scored
by the verifier or the judge; its commit also counts production_scored (and _verifier / _judge)
and production_kept_rollouts in the stats, in the same transaction as its records and its ack.
"""

from __future__ import annotations

import asyncio
import uuid

from flywheel.sampler.client import Endpoint
from flywheel.sampler.config import GrpoSampleConfig
from flywheel.sampler.cursor import PromptCursor
from flywheel.sampler.prompts import PromptItem
from flywheel.sampler.queue import RolloutQueue
from flywheel.sampler.run import (
    GroupCommitter,
    JsonlWriter,
    PromptScorers,
    RunStats,
    finish,
    run_prompts,
    score_group,
)
from flywheel.server.errors import UserError


async def sample_grpo(config: GrpoSampleConfig) -> dict:
    if not config.to_queue and config.output is None:
        raise UserError("nothing to write: use --to-queue or --output")
    scorers = PromptScorers(config)
    endpoint = Endpoint(config.endpoint, max_connections=config.concurrency)
    queue = RolloutQueue(config.queue) if config.to_queue else None
    cursor = PromptCursor(queue, config.prompts) if queue is not None and config.resume else None
    stats = RunStats("grpo")
    if cursor is not None:
        stats.extra.update(cursor.resume())
        # before the file is opened for appending: committed records a killed run did not write
        stats.extra["reconciled_records"] = await asyncio.to_thread(cursor.reconcile, config.output)
    writer = JsonlWriter(config.output)
    committer = GroupCommitter(writer, queue, cursor)

    async def handle(item: PromptItem) -> None:
        await committer.start(item)
        sampled = await endpoint.sample(item, config.sampling)
        if item.production and queue is not None:  # before scoring: a scorer that fails shows as sampled - scored
            await asyncio.to_thread(queue.count, production_sampled=1)
        records = await score_group(scorers.for_item(item), sampled, item)
        # One id per sampled group, not per prompt: the same prompt sampled again (a sync round, a
        # resumed launch, a prompt file read twice) must not merge with an earlier group when both
        # land in one learner batch (advantages are computed per group_id). The prompt id stays in front.
        group_id = f"{item.id}#{uuid.uuid4().hex[:8]}"
        for r in records:
            r.group_id = group_id
        stats.add(records)
        counters = {}
        if config.drop_uniform_groups and len({r.reward for r in records}) <= 1:
            stats.skipped += len(records)
            counters = {"dropped_uniform_groups": 1, "dropped_uniform_rollouts": len(records)}
            records = []
        if item.production:  # the loop's report: production prompts sampled, scored (by which reward), kept
            source = scorers.source(item)
            counters |= {"production_scored": 1, f"production_scored_{source}": 1}
            counters["production_kept_rollouts"] = len(records)
        stats.accepted += len(records)
        # records, counters and the prompt's done mark in one transaction; then the JSONL file
        await committer.commit(item, records, counters)

    await run_prompts(config, stats, handle, closing=[writer, endpoint], skip=cursor.skip if cursor else None)
    if queue is not None:
        stats.extra["queue_backlog"] = queue.backlog()
    return finish(stats, config)


def run(config: GrpoSampleConfig) -> int:
    """Sample n completions per prompt, score them, push the groups to the rollout queue."""
    asyncio.run(sample_grpo(config))
    return 0
