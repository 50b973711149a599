"""`flywheel sample rejection`: best-of-n into SFT records and DPO preference pairs.

Per prompt, n samples are scored. SFT keeps (`keep`):
    correct: every sample with reward >= min_reward;
    best_k:  the k highest rewards among those with reward >= min_reward (ties: sampling order).
DPO takes the best and the worst sample of the group when their rewards differ by >= min_margin.
Samples that are not kept can be written to `rejected_output` for inspection.
"""

from __future__ import annotations

import asyncio
import uuid

from pydantic import BaseModel, Field

from flywheel.sampler.client import Endpoint
from flywheel.sampler.config import RejectionConfig
from flywheel.sampler.prompts import PromptItem
from flywheel.sampler.queue import RolloutQueue
from flywheel.sampler.record import RolloutRecord
from flywheel.sampler.run import JsonlWriter, RunStats, build_scorer, finish, push, run_prompts, score_group
from flywheel.server.errors import UserError


class PreferencePair(BaseModel):
    """A DPO pair: two completions of the same prompt, the better one chosen."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Unique id of the pair")
    group_id: str = Field(description="The prompt's id")
    margin: float = Field(description="chosen.reward - rejected.reward")
    chosen: RolloutRecord = Field(description="The higher-reward completion")
    rejected: RolloutRecord = Field(description="The lower-reward completion")


def select_sft(records: list[RolloutRecord], keep: str, k: int, min_reward: float) -> list[RolloutRecord]:
    eligible = [r for r in records if r.reward >= min_reward]
    if keep == "best_k":
        eligible = sorted(eligible, key=lambda r: -r.reward)[:k]  # sorted() is stable: ties keep sampling order
    return eligible


def select_pair(records: list[RolloutRecord], min_margin: float) -> PreferencePair | None:
    if len(records) < 2:
        return None
    best = max(records, key=lambda r: r.reward)
    worst = min(records, key=lambda r: r.reward)
    margin = best.reward - worst.reward
    if margin <= 0 or margin < min_margin:
        return None
    return PreferencePair(group_id=best.group_id, margin=margin, chosen=best, rejected=worst)


async def sample_rejection(config: RejectionConfig) -> dict:
    if not (config.sft_output or config.pairs_output or config.to_queue):
        raise UserError("nothing to write: set --sft-output, --pairs-output or --to-queue")
    scorer = build_scorer(config)
    endpoint = Endpoint(config.endpoint, max_connections=config.concurrency)
    queue = RolloutQueue(config.queue) if config.to_queue else None
    sft, pairs, rejected = (
        JsonlWriter(config.sft_output),
        JsonlWriter(config.pairs_output),
        JsonlWriter(config.rejected_output),
    )
    stats = RunStats("rejection", extra={"pairs": 0})

    async def handle(item: PromptItem) -> None:
        records = await score_group(scorer, await endpoint.sample(item, config.sampling), item)
        stats.add(records)
        kept = select_sft(records, config.keep, config.k, config.min_reward)
        kept_ids = {r.id for r in kept}
        stats.accepted += len(kept)
        stats.rejected += len(records) - len(kept)
        rejected.write([r.to_json() for r in records if r.id not in kept_ids])
        pair = select_pair(records, config.min_margin)
        if pair is not None:
            pairs.write([pair.model_dump_json()])
            stats.extra["pairs"] += 1
        await push(kept, item, sft, queue)

    await run_prompts(config, stats, handle, closing=[sft, pairs, rejected, endpoint])
    return finish(stats, config)


def run(config: RejectionConfig) -> int:
    """Best-of-n: keep correct / k best samples as SFT records, best vs worst as DPO pairs."""
    asyncio.run(sample_rejection(config))
    return 0
