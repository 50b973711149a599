"""The fault suite's long randomized run (issue 16 item 14): >= 20 random SIGKILLs over one `flywheel up`.

One `flywheel up` on tiny-qwen3 (real redis-server, vLLM server, sampler, GRPO trainer; save and push
every 2 steps), the harness of clients/faults.py: kill kinds drawn at random (trainer mid-step, in a
batch wait after a non-checkpoint step, mid-push; sampler mid-batch; server mid-push; Redis), each
followed by `flywheel up`'s restart of the component and a trainer step past the kill, plus a
fingerprint of the served version. Then a clean stop (SIGTERM) and the checks of tests/test_faults.py:
every produced rollout accounted for by id, none trained twice, every served version a checkpoint
whose weights give the served logprobs. Writes bench/results/chaos.json with flat keys (kills,
produced, trained, lost, trained_twice, pending, dead_lettered, ... and kills_<kind>).

    python bench/chaos.py                       # 24 kills, seed 0
    python bench/chaos.py --kills 30 --seed 1 --max-minutes 20

Stops killing after --max-minutes (the vLLM lock of clients/servers.py is held for the whole run, so
other server tests wait) and reports the kills it made. Server kills cost a vLLM start each (about a
minute on a 2-core machine): they are drawn less often (--server-weight).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel.clients.faults import (  # noqa: E402
    KINDS,
    FaultRun,
    Fingerprint,
    Kill,
    check_run,
    fault_loop_config,
    kill_summary,
    random_kinds,
)
from flywheel.clients.servers import vllm_lock  # noqa: E402
from flywheel.server.models import resolve_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--server-weight", type=float, default=0.3, help="relative weight of server kills (1: equal)")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="stop killing after this long")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with --workdir's run (flywheel up resumes it) and the kills and fingerprints of --out",
    )
    args = parser.parse_args()

    model = resolve_model(args.model)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fw-chaos-"))
    run_dir = work / "run"
    run = FaultRun(run_dir, fault_loop_config(run_dir, model, work / "prompts.jsonl"), work / "up.log")
    kinds = random_kinds(args.kills, args.seed, {"server_mid_push": args.server_weight})
    earlier_fingerprints = []
    if args.resume:  # a second session on the same run: its kills and fingerprints count with this one's
        before = json.loads(args.out.read_text())
        run.kills = [Kill(**k) for k in before["kill_log"]]
        saved = work / "fingerprints.json"  # absent when --out came from a run before this file was written
        earlier_fingerprints = [Fingerprint(**f) for f in json.loads(saved.read_text())] if saved.is_file() else []
        kinds = kinds[len(run.kills) :]
    stop_rc = None
    error = None
    with vllm_lock():
        started = time.time()  # after the lock: --max-minutes bounds the time we hold it
        try:
            run.start()
            run.fingerprint()
            for i, kind in enumerate(kinds):
                if time.time() - started > args.max_minutes * 60:
                    print(f"chaos: --max-minutes reached after {i} kills", flush=True)
                    break
                kill = run.kill(kind, timeout_s=240)
                run.recover(kill, timeout_s=400)
                print(
                    f"chaos: kill {i + 1}/{len(kinds)} {kill.kind} at step {kill.step} hit={kill.hit} "
                    f"({kill.detail}); recovered in {kill.recovered_s} s",
                    flush=True,
                )
            stop_rc = run.stop()
        except AssertionError as exc:  # a kill that found no moment, or a loop that did not recover: reported
            error = str(exc)[-2000:]
            print(f"chaos: stopped: {error}", flush=True)
        finally:
            run.close()
    wall_s = time.time() - started
    fingerprints = earlier_fingerprints + run.fingerprints
    (work / "fingerprints.json").write_text(json.dumps([asdict(f) for f in fingerprints]))
    report = check_run(run_dir, model, fingerprints)
    if args.resume and not earlier_fingerprints:  # the earlier session's fingerprints, as it checked them
        report["fingerprint_rows"] = before["fingerprint_rows"] + report["fingerprint_rows"]
        report["fingerprints"] += before["fingerprints"]
        report["fingerprint_mismatches"] += before["fingerprint_mismatches"]
        for key in ("versions_checked", "versions_without_checkpoint"):
            report[key] = sorted(set(report[key]) | set(before[key]))
        report["fingerprint_max_abs_diff"] = max(
            (x for x in (report["fingerprint_max_abs_diff"], before["fingerprint_max_abs_diff"]) if x is not None),
            default=None,
        )
    summary = kill_summary(run.kills)
    import torch
    import vllm

    results = {
        "command": "chaos.py " + " ".join(sys.argv[1:]),
        "machine": platform.node(),
        "cpus": __import__("os").cpu_count(),
        "versions": f"torch {torch.__version__}, vllm {vllm.__version__}",
        "model": args.model,
        "seed": args.seed,
        "wall_s": round(wall_s, 1),
        "stop_rc": stop_rc,
        "error": error,
        "kills": summary["kills"],
        **{f"kills_{k}": summary["kills_by_kind"][k] for k in KINDS},
        "kills_missed_moment": sum(1 for k in run.kills if not k.hit),
        "restarts": {name: run.restarts(name) for name in ("trainer", "sampler", "server", "redis")},
        **{k: v for k, v in report.items() if k not in ("fingerprint_rows", "lost_ids", "redis_counters")},
        "lost_ids": report["lost_ids"],
        "redis_counters": report["redis_counters"],
        "balanced": report["produced"]
        == report["trained"] + report["dropped_stale"] + report["pending"] + report["queued"] + report["dead_lettered"],
        "kill_log": summary["kill_log"],
        "fingerprint_rows": report["fingerprint_rows"],
        "workdir": str(work),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("kill_log", "fingerprint_rows")}, indent=2))
    ok = error is None and results["lost"] == 0 and results["trained_twice"] == 0 and results["balanced"]
    return 0 if ok and results["fingerprint_mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
