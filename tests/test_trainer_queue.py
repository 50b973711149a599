"""GRPO from the real Redis rollout queue: whole groups, dead letters, ack only when durable, kill + resume.

Records here are synthetic (random ids, constant behaviour logprobs): the queue semantics are
under test, not learning.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from flywheel.sampler.config import QueueConfig
from flywheel.sampler.queue import RolloutQueue
from flywheel.sampler.record import RolloutRecord
from flywheel.trainer.checkpoint import latest_checkpoint
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.train import train

REPO = Path(__file__).resolve().parents[1]


def records(groups: int, size: int = 4, seed: int = 0) -> list[RolloutRecord]:
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        for i in range(size):
            n = rng.randint(3, 6)
            out.append(
                RolloutRecord(
                    group_id=f"s{seed}g{g}",
                    prompt_token_ids=[rng.randrange(5000) for _ in range(4)],
                    completion_token_ids=[rng.randrange(5000) for _ in range(n)],
                    behavior_logprobs=[-9.0] * n,
                    reward=float(i % 2),
                )
            )
    return out


def queue_config(tmp_path, tiny_model, redis_url, **overrides) -> TrainConfig:
    values = dict(
        objective="grpo",
        model=str(tiny_model),
        run_dir=tmp_path / "run",
        lr=1e-3,
        max_seq_len=32,
        micro_batch_tokens=128,
        batch_size=8,
        max_steps=2,
        save_every=1,
        queue={"url": redis_url, "claim_idle_s": 1.0},
        queue_input={"block_s": 0.2, "max_wait_s": 30},
        grpo={"group_size": 4},
    )
    values.update(overrides)
    return TrainConfig(**values)


def trained_ids(run_dir: Path) -> list[str]:
    state = json.loads((latest_checkpoint(run_dir) / "trainer_state" / "state.json").read_text())
    return state["trained_ids"]


def test_queue_training_takes_whole_groups_dead_letters_bad_records_and_acks(
    tmp_path, tiny_model, redis_client, redis_url
):
    queue = RolloutQueue(QueueConfig(url=redis_url))
    # two groups interleaved: a step of 8 must wait until both groups of 4 are complete
    recs = records(4)
    order = recs[0:2] + recs[4:6] + recs[2:4] + recs[6:8] + recs[8:]
    queue.put(order[:6])
    bad = recs[0].model_dump(mode="json") | {"id": "bad", "behavior_logprobs": [-1.0]}  # 1 logprob for 3+ tokens
    redis_client.xadd("rollouts", {"r": msgpack.packb(bad, use_bin_type=True)})
    queue.put(order[6:])
    state = train(queue_config(tmp_path, tiny_model, redis_url))
    assert state.step == 2
    ids = trained_ids(tmp_path / "run")
    assert sorted(ids) == sorted(r.id for r in recs) and len(set(ids)) == 16
    stats = queue.stats()
    assert stats["pending"] == 0 and stats["lag"] == 0 and stats["dead_letter_length"] == 1
    [dead] = queue.dead_letters()
    assert "behavior_logprobs has 1 entries" in dead["reason"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in rows] == [8, 8]


@pytest.mark.parametrize("backend", ["transformers", "megatron"])
def test_kill_and_resume_trains_every_record_exactly_once(tmp_path, tiny_model, redis_client, redis_url, backend):
    queue = RolloutQueue(QueueConfig(url=redis_url))
    recs = records(6)
    queue.put(recs)
    config = queue_config(tmp_path, tiny_model, redis_url, batch_size=4, max_steps=6, save_every=2, backend=backend)
    argv = [
        sys.executable,
        "-m",
        "flywheel.clients.cli",
        "train",
        "--backend",
        backend,
        "--objective",
        "grpo",
        "--model",
        str(tiny_model),
        "--run-dir",
        str(config.run_dir),
        "--lr",
        "1e-3",
        "--max-seq-len",
        "32",
        "--micro-batch-tokens",
        "128",
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--queue.url",
        redis_url,
        "--queue.claim-idle-s",
        "1",
        "--queue-input.block-s",
        "0.2",
        "--grpo.group-size",
        "4",
    ]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=os.environ | {"FLYWHEEL_HOME": os.environ["FLYWHEEL_HOME"]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = config.run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # step 3 trained, not yet saved
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "trainer did not reach step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    saved = latest_checkpoint(config.run_dir)
    assert saved is not None and saved.name in ("step_000002", "step_000004")
    before = queue.stats()
    assert before["pending"] > 0  # what was trained after the checkpoint was not acked
    assert len(trained_ids(config.run_dir)) == int(saved.name[-6:]) * 4

    time.sleep(1.1)  # let the dead consumer's entries become reclaimable
    try:
        state = train(config.model_copy(update={"resume": True}))
    finally:
        if backend == "megatron":  # the in-process world of one must not outlive this test
            from flywheel.trainer.megatron.parallel import shutdown

            shutdown()
    assert state.step == 6
    ids = trained_ids(config.run_dir)
    assert len(ids) == 24 and sorted(ids) == sorted(r.id for r in recs)  # none twice, none skipped
    after = queue.stats()
    assert after["pending"] == 0 and after["lag"] == 0 and after["dead_letter_length"] == 0


def test_trained_records_are_not_acked_before_their_checkpoint_even_after_a_long_wait(
    tmp_path, tiny_model, redis_client, redis_url
):
    """Issue 16 defect 1: after a step that does not checkpoint, the wait for the next batch outlived
    claim_idle_s, our own reclaim got the step's records back and acked them as duplicates; a crash
    before the next checkpoint then lost them. They must stay pending and come back after a crash."""

    from flywheel.server.errors import UserError
    from flywheel.trainer.checkpoint import TrainState
    from flywheel.trainer.queue_source import QueueSource

    config = queue_config(
        tmp_path,
        tiny_model,
        redis_url,
        batch_size=4,
        save_every=2,
        queue={"url": redis_url, "claim_idle_s": 0.5},
        queue_input={"block_s": 0.2, "max_wait_s": 3},
    )
    RolloutQueue(config.queue).put(records(1))  # one group of 4: one step's worth
    source = QueueSource(config)
    first = source.next_step(0, TrainState())
    trained = sorted(d.record.id for d in first.acks)
    assert len(trained) == 4
    with pytest.raises(
        UserError, match="no rollouts on stream"
    ):  # no next batch: the wait (3 s) outlives claim_idle_s (0.5 s) six times
        source.next_step(1, TrainState())
    pending = redis_client.xpending(config.queue.stream, config.queue.group)["pending"]
    assert pending == 4, "a trained but not yet checkpointed record was acked"
    source.close()  # the trainer dies here, before the checkpoint of step 1
    time.sleep(0.6)
    again = QueueSource(config).next_step(0, TrainState())  # the restarted trainer, from the last checkpoint
    assert sorted(d.record.id for d in again.acks) == trained


def test_dynamic_sampling_reads_on_past_groups_without_signal_and_acks_them(
    tmp_path, tiny_model, redis_client, redis_url
):
    queue = RolloutQueue(QueueConfig(url=redis_url))
    recs = records(4)
    for r in recs[:8]:
        r.reward = 1.0  # the first two groups arrive uniform: no signal
    queue.put(recs)
    config = queue_config(
        tmp_path, tiny_model, redis_url, max_steps=1, grpo={"group_size": 4, "dynamic_sampling": True}
    )
    state = train(config)
    [row] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the step read past the 8 uniform records until it held 8 with signal, and trained exactly those
    assert row["completions"] == 8 and row["zero_variance_groups"] == 0
    assert row["dynamic_dropped_groups"] == 2 and row["dynamic_dropped_rollouts"] == 8
    assert row["tokens"] == sum(len(r.completion_token_ids) for r in recs[8:])
    # nothing lost: the dropped records are in the checkpoint's ids and acked with the step
    assert state.step == 1 and sorted(trained_ids(tmp_path / "run")) == sorted(r.id for r in recs)
    stats = queue.stats()
    assert stats["pending"] == 0 and stats["lag"] == 0
