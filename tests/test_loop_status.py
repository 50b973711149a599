"""The loop's live status against a real Redis queue: a starved trainer is reported, not silent."""

from __future__ import annotations

from rich.console import Console

from flywheel.clients.loop_status import UNIFORM_STREAK_WARNING, LoopStatus, starvation_warning, status_table
from flywheel.sampler.config import QueueConfig
from flywheel.sampler.queue import RolloutQueue
from flywheel.sampler.record import RolloutRecord


def record(i: int) -> RolloutRecord:
    return RolloutRecord(
        group_id="g",
        prompt_token_ids=[1, 2],
        completion_token_ids=[3, i],
        behavior_logprobs=[-0.5, -0.5],
        reward=float(i),
    )


def rendered(s: dict) -> str:
    console = Console(width=200, record=True)
    console.print(status_table(s, "t", {}))
    return console.export_text()


def test_groups_dropped_in_a_row_raise_a_warning_until_the_queue_grows(redis_client, redis_url, tmp_path):
    config = QueueConfig(url=redis_url, stream="status-t")
    producer = RolloutQueue(config)
    # no server at this address: the status shows what it can (Redis, files) and no exception
    status = LoopStatus(tmp_path, "http://127.0.0.1:9", config)
    try:
        producer.put([record(0), record(1)])
        first = status.sample()
        assert first["produced"] == 2 and first["uniform_streak"] == 0 and "policy_version" not in first
        # the sampler drops uniform groups, one by one, and nothing reaches the queue
        for _ in range(UNIFORM_STREAK_WARNING - 1):
            producer.count(dropped_uniform_groups=1, dropped_uniform_rollouts=8)
        s = status.sample()
        assert s["uniform_streak"] == UNIFORM_STREAK_WARNING - 1 and starvation_warning(s) is None
        assert "warning" not in rendered(s)
        producer.count(dropped_uniform_groups=1, dropped_uniform_rollouts=8)
        s = status.sample()
        assert s["uniform_streak"] == UNIFORM_STREAK_WARNING
        assert f"the last {UNIFORM_STREAK_WARNING} sampled groups" in starvation_warning(s)
        assert "warning" in rendered(s) and "equal rewards" in rendered(s)
        # one kept group: the trainer is fed again and the warning goes away
        producer.put([record(2), record(3)])
        s = status.sample()
        assert s["produced"] == 4 and s["uniform_streak"] == 0 and starvation_warning(s) is None
    finally:
        status.close()
        producer.close()
