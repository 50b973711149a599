"""RolloutQueue against a real redis-server: delivery, reclaim after kill -9, backpressure, dead letters."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pytest

from flywheel.sampler.queue import QueueFull, RolloutQueue, SeenIds
from flywheel.sampler.record import RolloutRecord

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_records(n: int, group: str = "g") -> list[RolloutRecord]:
    return [
        RolloutRecord(
            group_id=group,
            prompt_token_ids=[1, 2, 3],
            completion_token_ids=[4, i],
            behavior_logprobs=[-0.5, -0.25],
            reward=float(i),
        )
        for i in range(n)
    ]


def test_put_get_ack_and_stats(redis_client, redis_url):
    q = RolloutQueue(url=redis_url, stream="t")
    records = make_records(5)
    q.put(records[:2])
    q.put(records[2:])
    got = q.get(count=10, block_s=0.1)
    assert [d.record for d in got] == records  # order kept, records intact
    assert all(d.deliveries == 1 for d in got)
    s = q.stats()
    assert (s["produced"], s["pending"], s["lag"], s["backlog"], s["acked"]) == (5, 5, 0, 5, 0)
    assert q.ack(got[:3]) == 3
    other_process_view = RolloutQueue(url=redis_url, stream="t").stats()  # stats live in Redis
    assert (other_process_view["acked"], other_process_view["pending"]) == (3, 2)
    assert q.get(count=1, block_s=0.05) == []  # nothing new; the 2 pending are not idle long enough


CONSUMER = textwrap.dedent("""
    import json, sys, time
    from flywheel.sampler.queue import RolloutQueue, SeenIds
    url, checkpoint = sys.argv[1], sys.argv[2]
    q = RolloutQueue(url=url, stream="t", claim_idle_s=0.5, consumer="doomed")
    batch = q.get(count=4, block_s=5)
    # "train" on the first two and checkpoint their ids, then die before the ack
    with open(checkpoint, "w") as f:
        json.dump([d.record.id for d in batch[:2]], f)
    print("READY", len(batch), flush=True)
    time.sleep(60)
""")


def test_consumer_killed_between_read_and_ack(redis_client, redis_url, tmp_path):
    q = RolloutQueue(url=redis_url, stream="t", claim_idle_s=0.5, consumer="survivor")
    records = make_records(6)
    q.put(records)
    checkpoint = tmp_path / "trained.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, redis_url, str(checkpoint)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().split() == ["READY", "4"]
    os.kill(proc.pid, signal.SIGKILL)  # between read and ack
    proc.wait()
    assert q.stats()["pending"] == 4

    # The survivor restores the checkpointed trained ids and drains the stream.
    seen = SeenIds(ids=json.loads(checkpoint.read_text()))
    trained = list(seen._ids)
    deadline = time.monotonic() + 10
    while len(trained) < len(records) and time.monotonic() < deadline:
        batch = q.get(count=4, block_s=0.2, seen=seen)
        for d in batch:
            trained.append(d.record.id)
            seen.add(d.record.id)
        q.ack(batch)
    assert sorted(trained) == sorted(r.id for r in records)  # nothing lost, nothing trained twice
    s = q.stats()
    assert s["reclaimed"] == 4 and s["duplicates_skipped"] == 2
    assert (s["pending"], s["backlog"]) == (0, 0)


def test_backpressure_blocks_producer_until_consumer_acks(redis_client, redis_url):
    q = RolloutQueue(url=redis_url, stream="t", max_backlog=4)
    q.put(make_records(4))
    start = time.monotonic()
    with pytest.raises(QueueFull):
        q.put(make_records(1), timeout_s=0.3)
    assert time.monotonic() - start >= 0.3
    assert q.stats()["produced"] == 4  # the refused record was not written

    done = threading.Event()
    threading.Thread(target=lambda: (q.put(make_records(2)), done.set()), daemon=True).start()
    time.sleep(0.3)
    assert not done.is_set()  # still blocked: backlog 4 + 2 > 4
    consumer = RolloutQueue(url=redis_url, stream="t", max_backlog=4)
    consumer.ack(consumer.get(count=2, block_s=0.1))
    assert done.wait(5)
    s = q.stats()
    assert s["produced"] == 6 and s["backlog"] == 4 and s["backpressure_waits"] >= 2


def test_dead_letter_after_n_failures(redis_client, redis_url):
    q = RolloutQueue(url=redis_url, stream="t", max_deliveries=3, claim_idle_s=0.2)
    good, bad = make_records(2)
    q.put([bad, good])
    deliveries_of_bad = []
    used = []
    for _ in range(20):
        for d in q.get(count=2, block_s=0.1):
            if d.record.id == bad.id:
                deliveries_of_bad.append(d.deliveries)
                q.nack(d, "loss was NaN")
            else:
                used.append(d.record.id)
                q.ack([d])
        if q.stats()["dead_lettered"]:
            break
    assert deliveries_of_bad == [1, 2, 3] and used == [good.id]
    [dead] = q.dead_letters()
    assert dead["reason"] == "failed 3 times; last failure: loss was NaN" and dead["deliveries"] == "3"
    assert RolloutRecord.from_bytes(dead["r"]) == bad  # the payload is kept for inspection
    assert q.stats()["backlog"] == 0


def test_unacked_entries_dead_letter_after_max_deliveries(redis_client, redis_url):
    q = RolloutQueue(url=redis_url, stream="t", max_deliveries=2, claim_idle_s=0.1)
    q.put(make_records(1))
    seen_deliveries = []
    for _ in range(3):  # the consumer takes the entry and never acks (it keeps crashing)
        seen_deliveries += [d.deliveries for d in q.get(count=1, block_s=0.05)]
        time.sleep(0.15)
    q.get(count=1, block_s=0.05)
    assert seen_deliveries == [1, 2]
    [dead] = q.dead_letters()
    assert dead["reason"] == "delivered 2 times without ack"


def test_bad_entries_go_to_dead_letter_with_reason(redis_client, redis_url, caplog):
    q = RolloutQueue(url=redis_url, stream="t")
    q.put(make_records(1))  # creates the group
    obj = make_records(1)[0].model_dump(mode="json")
    obj["schema_version"] = 99
    redis_client.xadd("t", {"r": b"\xc1\xff garbage"})
    redis_client.xadd("t", {"r": msgpack.packb(obj)})
    redis_client.xadd("t", {"other": b"x"})
    redis_client.xadd("t", {"r": msgpack.packb([1, 2, 3])})
    good = make_records(1)[0]
    q.put(good)
    with caplog.at_level(logging.WARNING, logger="flywheel.queue"):
        got = q.get(count=10, block_s=0.1)
    assert len(got) == 2 and got[1].record == good
    reasons = [d["reason"] for d in q.dead_letters()]
    assert len(reasons) == 4 and all(r.startswith("undecodable: ") for r in reasons)
    assert "not msgpack" in reasons[0]
    assert "schema_version 99 is not supported" in reasons[1]
    assert "no field 'r'" in reasons[2]
    assert "must be a map" in reasons[3]
    assert sum("dead-lettering" in r.message for r in caplog.records) == 4
    assert q.stats()["pending"] == 2  # only the two good ones wait for an ack


def test_trim_never_drops_unacked(redis_client, redis_url):
    q = RolloutQueue(url=redis_url, stream="t", trim_every=1)
    q.put(make_records(300))
    got = q.get(count=300, block_s=0.1)
    q.ack(got[1:])  # the first stays pending (a stuck consumer)
    q.put(make_records(300))  # never read yet
    q.trim()
    ids = [i.decode() for i, _ in redis_client.xrange("t")]
    assert got[0].entry_id in ids
    assert q.stats()["backlog"] == 301
    q.ack(got[:1])
    q.trim()
    unread_left = redis_client.xlen("t")
    assert 300 <= unread_left < 600  # acked ones trimmed (approximately), unread all kept
    assert len(q.get(count=400, block_s=0.1)) == 300


def test_seen_ids_state_roundtrip():
    seen = SeenIds(capacity=3, ids=["a", "b"])
    for i in "cd":
        seen.add(i)
    assert "a" not in seen and all(i in seen for i in "bcd")
    assert "c" in SeenIds.from_state_dict(json.loads(json.dumps(seen.state_dict())))


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server this test may stop and restart on the same port."""
    from flywheel.clients.servers import start_redis

    proc, url = start_redis(tmp_path)
    procs = [proc]
    port = int(url.rsplit(":", 1)[1].split("/")[0])

    def start():  # again, on the same port
        procs.append(start_redis(tmp_path, port)[0])

    yield url, procs, start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(5)


def test_redis_restart_producer_keeps_records(own_redis, caplog):
    url, procs, start = own_redis
    q = RolloutQueue(url=url, stream="t")
    q.put(make_records(1))
    procs[-1].kill()
    procs[-1].wait()
    held = make_records(3, group="held")
    result = {}
    with caplog.at_level(logging.WARNING, logger="flywheel.queue"):
        thread = threading.Thread(target=lambda: result.update(ids=q.put(held)), daemon=True)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # retrying, not failed
        start()  # a restarted Redis without persistence: stream and group are gone
        thread.join(10)
    assert len(result["ids"]) == 3 and q.outages >= 1
    assert any("unreachable" in r.message for r in caplog.records)
    got = RolloutQueue(url=url, stream="t").get(count=10, block_s=0.2)
    assert [d.record for d in got] == held
