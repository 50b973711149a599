"""Learning on the real model: SmolLM2-135M-Instruct, GRPO through `flywheel up`, held-out eval before and after.

Runs `flywheel up --config configs/loop.yaml` (easy chain_sum, last-number + format reward) for
--steps optimizer steps. Eval runs `flywheel eval --watch` on a fixed-seed held-out set
(RUN_DIR/eval/heldout.jsonl, seed 10,000,000: never a training prompt) once per policy version,
so the first history line is the model before training (version 0) and the last one the final
policy. Writes bench/results/loop_learning.json with both scores, the reward curve's first and
last quarter, and the command; the numbers are whatever they are.

    python bench/loop_learning.py --steps 30 [--run-dir runs/smollm2-grpo] [--eval-size 50] [--out F] \
        [flywheel up flags, e.g. --lr 1e-5]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel.clients.report import loop_summary  # noqa: E402
from flywheel.clients.servers import vllm_lock  # noqa: E402


def reward_parts(run_dir: Path) -> dict:
    """Each reward's mean over the first and the last quarter of the sampled rollouts (all of them, kept or
    not in a batch): which part of the reward moved (correctness or format)."""
    path = run_dir / "sampler" / "rollouts.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    quarter = len(records) // 4
    if not quarter:
        return {}
    out = {"sampled_rollouts": len(records)}
    for label, part in (("first_quarter", records[:quarter]), ("last_quarter", records[-quarter:])):
        for name in sorted({r["name"] for rec in part for r in rec.get("rewards", [])}):
            out[f"sampled_{name}_{label}"] = round(
                sum(r["value"] for rec in part for r in rec.get("rewards", []) if r["name"] == name) / len(part), 4
            )
    return out


def format_compliance(eval_run_dir: str | None, pattern: str) -> float | None:
    """Fraction of a version's held-out greedy replies that match the loop's answer-format regex
    (configs/loop.yaml's format_regex reward), read from that eval run's samples.jsonl."""
    path = Path(eval_run_dir or "") / "samples.jsonl"
    if not eval_run_dir or not path.is_file():
        return None
    replies = [c for line in path.read_text().splitlines() if line.strip() for c in json.loads(line)["completions"]]
    if not replies:
        return None
    return round(sum(bool(re.fullmatch(pattern, c.strip(), re.DOTALL)) for c in replies) / len(replies), 4)


def format_pattern() -> str:
    config = yaml.safe_load((REPO / "configs" / "loop.yaml").read_text())
    return next(r["options"]["pattern"] for r in config["rewards"] if r["name"] == "format_regex")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/smollm2-grpo"))
    parser.add_argument("--eval-size", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loop_learning.json")
    args, extra = parser.parse_known_args()  # anything else goes to `flywheel up`, e.g. --lr 1e-5
    argv = [
        sys.executable,
        "-m",
        "flywheel.clients.cli",
        "up",
        "--config",
        str(REPO / "configs" / "loop.yaml"),
        "--run-dir",
        str(args.run_dir),
        "--max-steps",
        str(args.steps),
        "--eval-size",
        str(args.eval_size),
        "--no-live",
        *extra,
    ]
    start = time.time()
    with vllm_lock():
        rc = subprocess.call(argv, cwd=REPO)
    summary = loop_summary(args.run_dir)
    history = (
        [
            json.loads(line)
            for line in (args.run_dir / "eval" / "history.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if (args.run_dir / "eval" / "history.jsonl").is_file()
        else []
    )
    history.sort(key=lambda h: h["version"])

    def score(h):
        return sum(h["scores"].values()) / len(h["scores"])

    results = {
        "command": " ".join(["python", "bench/loop_learning.py", *sys.argv[1:]]),
        "machine": platform.node(),
        "rc": rc,
        "wall_s": round(time.time() - start, 1),
        "steps": summary.get("steps"),
        "eval_size": args.eval_size,
        "eval_versions": len(history),
    }
    if history:
        results |= {
            "eval_before_version": history[0]["version"],
            "eval_before": score(history[0]),
            "eval_after_version": history[-1]["version"],
            "eval_after": score(history[-1]),
        }
        results["after_vs_before_ratio"] = (
            round(results["eval_after"] / results["eval_before"], 3) if results["eval_before"] else None
        )
        # issue 17 item 6's keys: held-out answer-format compliance and accuracy gain in points
        pattern = format_pattern()
        results["format_before"] = format_compliance(history[0].get("run_dir"), pattern)
        results["format_after"] = format_compliance(history[-1].get("run_dir"), pattern)
        results["accuracy_gain_points"] = round(100 * (results["eval_after"] - results["eval_before"]), 1)
    for key in (
        "reward_first_quarter",
        "reward_last_quarter",
        "optimizer_steps_per_hour",
        "rollouts_per_s",
        "dropped_stale",
    ):
        if summary.get(key) is not None:
            results[key] = summary[key]
    results |= reward_parts(args.run_dir)
    out = args.out
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
