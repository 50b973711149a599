"""Sampling modes against the real tiny-qwen3 server (session `server` fixture) and real Redis."""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict

from flywheel.sampler.config import (
    DistillConfig,
    EndpointConfig,
    GrpoSampleConfig,
    PromptSourceConfig,
    QueueConfig,
    RejectionConfig,
    SamplingConfig,
)
from flywheel.sampler.distill import sample_distill
from flywheel.sampler.grpo import sample_grpo
from flywheel.sampler.queue import PromptQueue, RolloutQueue
from flywheel.sampler.record import RolloutRecord
from flywheel.sampler.rejection import PreferencePair, sample_rejection
from flywheel.sampler.rewards import RewardSpec
from flywheel.server.capture import CapturedRequest


def first_token_even(completion, answer, completion_token_ids=(), **context):
    """A reward whose truth is known without the model: 1 when the first sampled token id is even."""
    return float(bool(completion_token_ids) and completion_token_ids[0] % 2 == 0)


def first_token_graded(completion, answer, completion_token_ids=(), **context):
    """Graded known reward in [0, 0.9]: last digit of the first token id / 10."""
    return (completion_token_ids[0] % 10) / 10 if completion_token_ids else 0.0


def common(server, redis_url, **kw):
    return dict(
        endpoint=EndpointConfig(base_url=server.base_url, model=server.model),
        queue=QueueConfig(url=redis_url, stream="rollouts"),
        progress=False,
        **kw,
    )


def read_jsonl(path, model=RolloutRecord):
    return [model.model_validate_json(line) for line in path.read_text().splitlines()]


def test_grpo_pushes_scored_groups_with_tokens_and_versions(server, redis_client, redis_url, tmp_path):
    config = GrpoSampleConfig(
        **common(server, redis_url),
        prompts=PromptSourceConfig(num_prompts=4),
        sampling=SamplingConfig(n=4, max_tokens=12, seed=1),
        drop_uniform_groups=False,
        output=tmp_path / "grpo.jsonl",
    )
    summary = asyncio.run(sample_grpo(config))
    assert (summary["prompts"], summary["samples"], summary["accepted"], summary["errors"]) == (4, 16, 16, 0)
    got = RolloutQueue(url=redis_url, stream="rollouts").get(count=100, block_s=0.2)
    records = [d.record for d in got]
    assert len(records) == 16
    groups = defaultdict(list)
    for r in records:
        groups[r.group_id].append(r)
    # one id per sampled group: the prompt's id, then a nonce (sampling the prompts again gives new groups)
    assert sorted(g.split("#")[0] for g in groups) == [f"chain_sum:0:{i}" for i in range(4)]
    for group in groups.values():
        assert len(group) == 4 and len({tuple(r.prompt_token_ids) for r in group}) == 1
    for r in records:
        assert r.prompt_token_ids and 1 <= len(r.completion_token_ids) <= 12
        assert len(r.behavior_logprobs) == len(r.completion_token_ids) and all(lp <= 0 for lp in r.behavior_logprobs)
        assert r.policy_versions == [0] and r.source == "sampled"
        assert r.answer["question"] in r.messages[0]["content"] and r.answer["question"] in r.prompt
        assert [w.name for w in r.rewards] == ["reasoning_gym"] and r.reward == r.rewards[0].value
        assert r.sampling["max_tokens"] == 12 and r.finish_reason in ("stop", "length")
    assert summary["completion_tokens"] == sum(len(r.completion_token_ids) for r in records)
    assert sorted(r.id for r in read_jsonl(tmp_path / "grpo.jsonl")) == sorted(r.id for r in records)
    again = GrpoSampleConfig(
        **common(server, redis_url),
        prompts=PromptSourceConfig(num_prompts=4),
        sampling=SamplingConfig(n=4, max_tokens=12, seed=1),
        drop_uniform_groups=False,
        resume=False,  # the same prompts again on purpose (with the cursor on, they are done already)
    )
    asyncio.run(sample_grpo(again))
    second = {d.record.group_id for d in RolloutQueue(url=redis_url, stream="rollouts").get(count=100, block_s=0.2)}
    assert len(second) == 4 and not second & set(groups)
    assert sorted(g.split("#")[0] for g in second) == sorted(g.split("#")[0] for g in groups)


def test_rejection_keeps_exactly_the_right_records(server, redis_client, redis_url, tmp_path):
    out = {k: tmp_path / f"{k}.jsonl" for k in ("sft", "pairs", "rejected")}
    config = RejectionConfig(
        **common(server, redis_url),
        prompts=PromptSourceConfig(num_prompts=6),
        sampling=SamplingConfig(n=6, max_tokens=4, seed=7),
        rewards=[RewardSpec(name="tests.test_sample:first_token_even")],
        keep="correct",
        min_reward=1.0,
        min_margin=1.0,
        sft_output=out["sft"],
        pairs_output=out["pairs"],
        rejected_output=out["rejected"],
    )
    summary = asyncio.run(sample_rejection(config))
    kept, dropped = read_jsonl(out["sft"]), read_jsonl(out["rejected"])
    assert len(kept) + len(dropped) == 36 == summary["samples"]
    assert summary["accepted"] == len(kept) and summary["rejected"] == len(dropped)
    assert all(r.completion_token_ids[0] % 2 == 0 and r.reward == 1.0 for r in kept)
    assert all(r.completion_token_ids[0] % 2 == 1 and r.reward == 0.0 for r in dropped)
    assert 0 < len(kept) < 36  # the known-correct set is neither empty nor everything
    by_group = defaultdict(list)
    for r in kept + dropped:
        by_group[r.group_id].append(r)
    mixed = {g for g, rs in by_group.items() if len({r.reward for r in rs}) == 2}
    pairs = read_jsonl(out["pairs"], PreferencePair)
    assert {p.group_id for p in pairs} == mixed and summary["pairs"] == len(mixed)
    for p in pairs:
        assert p.chosen.reward == 1.0 and p.rejected.reward == 0.0 and p.margin == 1.0
        assert p.chosen.prompt_token_ids == p.rejected.prompt_token_ids


def test_rejection_best_k(server, redis_client, redis_url, tmp_path):
    config = RejectionConfig(
        **common(server, redis_url),
        prompts=PromptSourceConfig(num_prompts=3),
        sampling=SamplingConfig(n=6, max_tokens=2, seed=3),
        rewards=[RewardSpec(name="tests.test_sample:first_token_graded")],
        keep="best_k",
        k=2,
        min_reward=0.2,
        to_queue=True,
        sft_output=tmp_path / "sft.jsonl",
        pairs_output=None,
        rejected_output=tmp_path / "rej.jsonl",
    )
    asyncio.run(sample_rejection(config))
    everything = read_jsonl(tmp_path / "sft.jsonl") + read_jsonl(tmp_path / "rej.jsonl")
    kept_ids = {r.id for r in read_jsonl(tmp_path / "sft.jsonl")}
    groups = defaultdict(list)
    for r in everything:
        groups[r.group_id].append(r)
    expected = set()
    for rs in groups.values():
        eligible = [r for r in rs if r.reward >= 0.2]
        assert all(math.isclose(r.reward, (r.completion_token_ids[0] % 10) / 10) for r in rs)
        top = sorted(r.reward for r in eligible)[-2:]
        assert sorted(r.reward for r in rs if r.id in kept_ids) == top
        expected |= {r.id for r in rs if r.id in kept_ids}
    assert expected == kept_ids
    queued = {d.record.id for d in RolloutQueue(url=redis_url, stream="rollouts").get(count=50, block_s=0.2)}
    assert queued == kept_ids


def test_distill_jsonl_resumes(server, redis_client, redis_url, tmp_path):
    output = tmp_path / "distill.jsonl"

    def run(num_prompts):
        config = DistillConfig(
            **common(server, redis_url),
            prompts=PromptSourceConfig(num_prompts=num_prompts),
            sampling=SamplingConfig(n=2, max_tokens=6, seed=5),
            output=output,
        )
        return asyncio.run(sample_distill(config))

    first = run(3)
    assert first["samples"] == 6 and first["skipped"] == 0
    lines = output.read_text().splitlines(keepends=True)
    # simulate a crash: the last group only half written, its second line torn
    output.write_text("".join(lines[:5]) + lines[5][:20])
    second = run(5)
    assert second["resumed_done"] == 2 and second["skipped"] == 2 and second["samples"] == 6
    records = read_jsonl(output)
    assert [r.to_json() + "\n" for r in records[:4]] == lines[:4]  # finished prompts untouched
    counts = defaultdict(int)
    for r in records:
        counts[r.group_id] += 1
        assert r.source == "distilled" and r.completion_token_ids
    assert dict(counts) == {f"chain_sum:0:{i}": 2 for i in range(5)}  # each prompt exactly once
    assert run(5)["skipped"] == 5  # nothing left to do


def test_on_policy_distill_teacher_logprobs(server, redis_client, redis_url, tmp_path):
    """Teacher = the same server: its prompt_logprobs of the student's tokens equal the sampling logprobs."""
    config = DistillConfig(
        **common(server, redis_url),
        student=EndpointConfig(base_url=server.base_url, model=server.model),
        prompts=PromptSourceConfig(num_prompts=2),
        sampling=SamplingConfig(n=2, max_tokens=8, temperature=1.0, seed=2),
        output=tmp_path / "op.jsonl",
    )
    asyncio.run(sample_distill(config))
    records = read_jsonl(tmp_path / "op.jsonl")
    assert len(records) == 4
    for r in records:
        assert r.source == "sampled" and len(r.teacher_logprobs) == len(r.completion_token_ids)
        for student, teacher in zip(r.behavior_logprobs, r.teacher_logprobs):
            assert abs(student - teacher) < 0.05


def test_grpo_from_capture_stream_acks_prompts(server, redis_client, redis_url):
    prompts = PromptQueue(url=redis_url)
    for q in ("What is 2 + 3?", "What is 1 + 1?"):
        prompts.put(CapturedRequest(endpoint="chat", messages=[{"role": "user", "content": q}], responses=["x"]))
    prompts.put(CapturedRequest(endpoint="chat", status=500, messages=[{"role": "user", "content": "err"}]))
    config = GrpoSampleConfig(
        **common(server, redis_url),
        prompts=PromptSourceConfig(kind="capture", num_prompts=2),
        sampling=SamplingConfig(n=2, max_tokens=4),
        rewards=[RewardSpec(name="length_penalty", options={"target": 1, "limit": 8})],
        drop_uniform_groups=False,
    )
    summary = asyncio.run(sample_grpo(config))
    assert summary["prompts"] == 2 and summary["accepted"] == 4
    records = [d.record for d in RolloutQueue(url=redis_url, stream="rollouts").get(count=10, block_s=0.2)]
    assert sorted(r.messages[0]["content"] for r in records) == ["What is 1 + 1?"] * 2 + ["What is 2 + 3?"] * 2
    assert all(r.task == "production" for r in records)
    assert prompts.stats()["pending"] == 0 and prompts.stats()["acked"] == 2  # used prompts acked


def test_cli_rejects_bad_settings(tmp_path, capsys):
    from flywheel.clients.cli import main

    assert (
        main(
            [
                "sample",
                "rejection",
                "--prompts.kind",
                "jsonl",
                "--prompts.path",
                str(tmp_path / "none.jsonl"),
                "--no-progress",
                "--endpoint.model",
                "m",
            ]
        )
        == 2
    )
    assert "prompts file not found" in capsys.readouterr().err
    assert main(["sample", "grpo", "--sampling.n", "0"]) == 2
    assert main(["sample", "grpo", "--rewards", json.dumps([{"name": "nope"}]), "--no-progress"]) == 2
    assert "rewards: unknown scorer" in capsys.readouterr().err
