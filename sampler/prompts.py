"""Prompt sources for the sampler: a reasoning-gym task, a JSONL file, or the production capture stream.

Every source yields PromptItems with a stable `id` (it becomes the records' group_id, and is what a
resumed distill run uses to skip prompts already done):
    gym:     '<task>:<seed>:<index>'
    jsonl:   the line's "id" field, else '<file name>:<line number>'
    capture: 'capture:<the capture's id>' (PRODUCTION_PREFIX: the trainer counts production records by it)
JSONL lines hold "messages" (chat) or "prompt" (text), plus optional "answer", "task", "id".

Every item also has a `key`, its place in its source (gym: the index; jsonl: the line number;
capture: the stream entry id), and `source_name` names the sequence itself (what defines it, hashed):
the sampler's durable cursor (sampler/cursor.py) records prompts by (source_name, key), and a
restart passes `skip` so the done ones are not even built again.

Production prompts (`flywheel up --production-prompts`): kind=capture takes only captured requests;
kind gym/jsonl with production_fraction > 0 mixes them in (`mixed_prompts`). A captured request may
name its reference answer in the OpenAI request's `metadata` ({"answer": "5", "task": "chain_sum"},
which the capture keeps with the other request fields): then the item has that answer and the
sampler scores it with the verifier, else with the production reward (a judge).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flywheel.sampler.config import PromptSourceConfig, QueueConfig
from flywheel.sampler.queue import PromptQueue, SeenIds
from flywheel.server.errors import UserError
from flywheel.server.jsonl import JSONLineError, json_lines


@dataclass
class PromptItem:
    """One prompt to sample: chat messages (or raw text), the reference answer, and where it came from."""

    id: str
    messages: list[dict[str, Any]] | None
    key: str = ""  # place in the source (index / line number / capture entry id): the cursor's key
    prompt: str | None = None
    answer: Any = None
    task: str = ""
    done: Callable[[], None] | None = field(default=None, repr=False)  # capture source: acks the entry; call after use
    production: bool = False  # a captured production request (its done mark is the entry's ack)


PRODUCTION_PREFIX = "capture:"


def is_production(group_id: str) -> bool:
    """Whether a record's group came from a captured production prompt (its id starts with PRODUCTION_PREFIX)."""
    return group_id.startswith(PRODUCTION_PREFIX)


def _with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if system and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def source_name(config: PromptSourceConfig) -> str:
    """Names the prompt sequence: the same name on a restart means the same prompts at the same keys.

    Only what decides the prompts counts (num_prompts does not: a longer run of the same source
    resumes it)."""
    if config.kind == "gym":
        what = [config.task, config.seed, config.task_options, config.instruction, config.system]
        label = f"gym:{config.task}:{config.seed}"
    elif config.kind == "jsonl":
        what = [str(config.path.resolve()) if config.path else None, config.system]
        label = f"jsonl:{config.path.name if config.path else ''}"
    else:
        what = [config.capture_stream, config.capture_group]
        label = f"capture:{config.capture_stream}"
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{label}:{digest}"


def _never(key: str) -> bool:
    return False


def gym_prompts(config: PromptSourceConfig, skip: Callable[[str], bool] = _never) -> Iterator[PromptItem]:
    import reasoning_gym

    size = config.num_prompts or 100_000
    try:
        data = reasoning_gym.create_dataset(config.task, size=size, seed=config.seed, **config.task_options)
    except Exception as exc:
        raise UserError(f"reasoning-gym task {config.task!r} with {config.task_options}: {exc}") from None
    for index in range(size):
        if skip(str(index)):
            continue
        entry = data[index]
        messages = [{"role": "user", "content": entry["question"] + config.instruction}]
        yield PromptItem(
            id=f"{config.task}:{config.seed}:{index}",
            messages=_with_system(messages, config.system),
            key=str(index),
            answer=entry,
            task=config.task,
        )


def check_jsonl(config: PromptSourceConfig) -> None:
    if config.path is None:
        raise UserError("--prompts.path is required with --prompts.kind jsonl")
    if not config.path.is_file():
        raise UserError(f"prompts file not found: {config.path}")


def jsonl_prompts(config: PromptSourceConfig, skip: Callable[[str], bool] = _never) -> Iterator[PromptItem]:
    count = 0
    try:
        for number, row in json_lines(config.path):
            if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
                raise UserError(f"{config.path}:{number}: needs a 'messages' or 'prompt' field")
            count += 1  # a skipped (done) line counts: num_prompts is the first N lines, resumed or not
            if not skip(str(number)):
                messages = _with_system(row["messages"], config.system) if "messages" in row else None
                yield PromptItem(
                    id=str(row.get("id", f"{config.path.name}:{number}")),
                    messages=messages,
                    prompt=row.get("prompt"),
                    answer=row.get("answer"),
                    task=row.get("task", config.path.stem),
                    key=str(number),
                )
            if config.num_prompts and count >= config.num_prompts:
                return
    except JSONLineError as exc:
        raise UserError(f"{exc.where}: not JSON: {exc.error}") from None


def capture_item(stream: PromptQueue, d: Any) -> PromptItem | None:
    """The prompt of one capture delivery; None (and acked) when it is not reusable as a prompt."""
    c = d.record
    if c.status != 200 or (c.messages is None and not isinstance(c.prompt, str)):
        stream.ack([d])  # errors and token-id prompts are not reusable as prompts
        return None
    metadata = c.sampling.get("metadata") if isinstance(c.sampling.get("metadata"), dict) else {}
    return PromptItem(
        id=PRODUCTION_PREFIX + c.id,
        messages=c.messages,
        prompt=c.prompt if c.messages is None else None,
        answer=metadata.get("answer"),
        task=str(metadata.get("task") or "production"),
        key=d.entry_id,
        done=lambda d=d: stream.ack([d]),
        production=True,
    )


def capture_prompts(config: PromptSourceConfig, queue: QueueConfig) -> Iterator[PromptItem]:
    """Captured production requests; the caller calls `item.done()` once the group is pushed (at-least-once).

    An entry this process handed out is never handed out again: the queue's reclaim of idle entries
    (claim_idle_s) also returns this process's own entries that are still being sampled (a slow
    generation), which were then sampled twice. An entry a killed sampler held is reclaimed by the
    next process, which never saw it."""
    stream = PromptQueue(queue, stream=config.capture_stream, group=config.capture_group)
    handed = SeenIds()
    count = 0
    while config.num_prompts is None or count < config.num_prompts:
        for d in stream.get(count=1, block_s=1.0):
            if d.entry_id in handed:
                continue  # our own, still in flight (its ack comes with its group's commit)
            handed.add(d.entry_id)
            item = capture_item(stream, d)
            if item is not None:
                yield item
                count += 1


def mixed_prompts(config: PromptSourceConfig, queue: QueueConfig, tasks: Iterator[PromptItem]) -> Iterator[PromptItem]:
    """The task's prompts with about `production_fraction` of captured ones interleaved: a captured
    prompt is taken whenever the share so far is below the fraction and one is waiting (never waited
    for: with no traffic the task's prompts go on). Ends with the task's prompts."""
    stream = PromptQueue(queue, stream=config.capture_stream, group=config.capture_group)
    taken = production = 0
    while True:
        item = None
        if production < config.production_fraction * (taken + 1):
            while item is None and (got := stream.get(count=1, block_s=0)):
                item = capture_item(stream, got[0])  # None for an unusable one (acked): try the next
        if item is None:
            item = next(tasks, None)
            if item is None:
                return
        else:
            production += 1
        taken += 1
        yield item


def iter_prompts(
    config: PromptSourceConfig, queue: QueueConfig, skip: Callable[[str], bool] = _never
) -> Iterator[PromptItem]:
    """The source's prompts, without those whose key `skip` says is done (a capture entry, once done,
    is acked and never delivered again, so capture needs no skip)."""
    if config.kind == "capture":
        return capture_prompts(config, queue)
    if config.kind == "gym":
        tasks = gym_prompts(config, skip)
    else:
        check_jsonl(config)  # now, not at the first prompt
        tasks = jsonl_prompts(config, skip)
    return mixed_prompts(config, queue, tasks) if config.production_fraction > 0 else tasks
