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


def test_a_dead_redis_shows_as_missing_values_and_a_sigterm_during_the_read_still_stops_the_loop(tmp_path):
    """`flywheel up` samples the status between checks of its children: a read that retried forever while
    Redis was down (SIGKILLed) kept it from ever seeing that Redis had died and restarting it, and the
    SIGTERM that should then have stopped it was swallowed by the read's `except Exception` (found by
    tests/test_faults.py)."""
    import signal
    import threading
    import time

    import pytest

    from flywheel.clients.up import Stop, _raise_stop
    from flywheel.server.net import free_port

    dead = QueueConfig(url=f"redis://127.0.0.1:{free_port()}/0", stream="status-dead")
    status = LoopStatus(tmp_path, "http://127.0.0.1:9", dead)
    previous = signal.signal(signal.SIGUSR1, _raise_stop)
    try:
        start = time.monotonic()
        s = status.sample()
        assert "produced" not in s and time.monotonic() - start < 10  # given up on, not waited for
        timer = threading.Timer(0.3, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1))
        timer.start()
        with pytest.raises(Stop):
            status.sample()  # the signal lands during the Redis read: it must come out as Stop
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        status.close()
