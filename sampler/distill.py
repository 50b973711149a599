"""`flywheel sample distill`: a teacher endpoint answers prompts; records stream to JSONL (resumable).

Off-policy (default): the teacher (`--endpoint.*`, any OpenAI-compatible URL) samples the
completions; records have source 'distilled' and the teacher's token ids (a student with another
tokenizer must re-tokenize the text; one with the same tokenizer trains on the ids).
On-policy (`--student.base-url`): the student samples, the teacher scores the student's own tokens
with prompt_logprobs; records have source 'sampled' and `teacher_logprobs` per completion token
(the teacher must share the student's tokenizer).

Resume: records of one prompt are appended in one write. On start, the output is read back; a
torn last line or an incomplete group (a crash mid-write) is removed, and prompts whose group is
complete are skipped, so re-running the same command finishes the job without duplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

from flywheel.sampler.client import Endpoint
from flywheel.sampler.config import DistillConfig
from flywheel.sampler.prompts import PromptItem
from flywheel.sampler.queue import RolloutQueue
from flywheel.sampler.record import RecordError, RolloutRecord
from flywheel.sampler.run import JsonlWriter, RunStats, build_scorer, finish, push, run_prompts, score_group

log = logging.getLogger("flywheel.sample")


def load_done(path: Path, n: int) -> set[str]:
    """Group ids with all n records in `path`; repairs a torn tail or incomplete groups in place."""
    if not path.is_file():
        return set()
    good: list[tuple[str, str]] = []
    torn = 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            if not line.endswith("\n"):
                raise RecordError("torn last line")
            good.append((RolloutRecord.from_json(line).group_id, line))
        except RecordError:
            torn += 1
    counts = Counter(g for g, _ in good)
    done = {g for g, c in counts.items() if c >= n}
    if torn or len(done) != len(counts):
        dropped = torn + sum(c for g, c in counts.items() if g not in done)
        log.warning("%s: removing %d lines of unfinished prompts before resuming", path, dropped)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line for g, line in good if g in done))
        tmp.replace(path)
    return done


async def sample_distill(config: DistillConfig) -> dict:
    n = config.sampling.n
    done = load_done(config.output, n)
    teacher = Endpoint(config.endpoint, max_connections=config.concurrency)
    student = Endpoint(config.student, max_connections=config.concurrency) if config.student else None
    scorer = build_scorer(config) if config.score else None
    queue = RolloutQueue(config.queue) if config.to_queue else None
    writer = JsonlWriter(config.output)
    stats = RunStats("distill", extra={"resumed_done": len(done)})

    async def handle(item: PromptItem) -> None:
        if item.id in done:
            stats.skipped += 1
            return
        if student is None:
            records = await teacher.sample(item, config.sampling)
            for r in records:
                r.source = "distilled"
        else:
            records = await student.sample(item, config.sampling)
            logprobs = await asyncio.gather(
                *(teacher.teacher_logprobs(r.prompt_token_ids, r.completion_token_ids) for r in records)
            )
            for r, lp in zip(records, logprobs):
                r.teacher_logprobs = lp
        if scorer is not None:
            records = await score_group(scorer, records, item)
        stats.add(records)
        stats.accepted += len(records)
        await push(records, item, writer, queue)

    await run_prompts(config, stats, handle, closing=[writer, teacher, student])
    return finish(stats, config)


def run(config: DistillConfig) -> int:
    """Teacher answers prompts (or scores the student's tokens); JSONL streaming, resumable."""
    asyncio.run(sample_distill(config))
    return 0
