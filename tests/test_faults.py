"""The fault suite's fast part (issue 16 item 14): one `flywheel up` run on tiny-qwen3 (real redis-server,
real vLLM server, sampler, GRPO trainer) whose components are SIGKILLed one after another at chosen
moments (clients/faults.py says how each moment is found): the trainer during a step, in a batch wait
after a non-checkpoint step (longer than claim_idle_s: defect 1's case), after its checkpoint mid-push;
the sampler mid-batch; Redis (restarted from its AOF); the server mid-push. `flywheel up` restarts each
in place and the run goes on; after a clean stop, every rollout produced is accounted for by id and
every version the server answered with is a checkpoint whose weights give the served logprobs.

bench/chaos.py is the long randomized run (>= 20 kills) over the same harness.
"""

from __future__ import annotations

import pytest

from flywheel.clients.faults import FaultRun, check_run, fault_loop_config
from flywheel.clients.servers import vllm_lock

SCHEDULE = (  # the CI part: ~4 min on 2 shared cores (one vLLM start)
    "trainer_mid_step",
    "trainer_batch_wait",
    "sampler_mid_batch",
    "trainer_mid_push",
    "redis",
)
# a server kill costs a second vLLM start (~2 min here): in the slow variant and in bench/chaos.py


@pytest.mark.parametrize(
    "schedule",
    [
        pytest.param(SCHEDULE, id="ci"),
        pytest.param((*SCHEDULE, "server_mid_push"), id="with-server", marks=pytest.mark.slow),
    ],
)
def test_sigkilled_components_lose_nothing_train_nothing_twice_and_serve_checkpoints(tmp_path, tiny_model, schedule):
    run_dir = tmp_path / "run"
    run = FaultRun(run_dir, fault_loop_config(run_dir, tiny_model, tmp_path / "prompts.jsonl"), tmp_path / "up.log")
    with vllm_lock():
        try:
            run.start()
            run.fingerprint()
            for kind in schedule:
                for _ in range(3):  # a push can finish before the poll sees its checkpoint: try the next push
                    kill = run.kill(kind, timeout_s=180)
                    run.recover(kill, timeout_s=300)
                    if kill.hit:
                        break
            assert run.stop() == 130, run.log_tail()  # a clean stop, as Ctrl-C: state kept
        finally:
            run.close()
    print({k.kind: (k.step, k.hit, k.detail, k.recovered_s) for k in run.kills})
    assert all([k for k in run.kills if k.kind == kind][-1].hit for kind in schedule)
    for name in {kind.split("_")[0] for kind in schedule}:  # each came back in place, the run went on
        assert run.restarts(name) >= 1, name

    report = check_run(run_dir, tiny_model, run.fingerprints)
    print({k: v for k, v in report.items() if k != "fingerprint_rows"})
    assert report["lost"] == 0, report["lost_ids"]
    assert report["trained_twice"] == 0 and report["produced_twice"] == 0 and report["trained_not_produced"] == 0
    assert report["produced"] == (
        report["trained"] + report["dropped_stale"] + report["pending"] + report["queued"] + report["dead_lettered"]
    )
    assert report["trained"] >= 16 * report["steps"] // 2 and report["steps"] >= 6
    counters = report["redis_counters"]
    assert report["produced"] == counters["produced"]
    # Redis's own counters balance too: every entry acked (trained, or a redelivery of one), pending, queued or dead
    assert counters["produced"] == (
        counters.get("acked", 0)
        + counters.get("duplicates_skipped", 0)
        + report["pending"]
        + report["queued"]
        + counters.get("dead_lettered", 0)
    ), counters
    # every version served (each answer names the one version that made it) is a checkpoint, and its weights
    assert report["fingerprints"] >= len(schedule) and max(report["versions_checked"]) > 0
    assert report["versions_without_checkpoint"] == []
    assert report["fingerprint_mismatches"] == 0, report["fingerprint_rows"]
