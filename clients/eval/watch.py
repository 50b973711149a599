"""Eval on version change: poll the server's policy version, evaluate each new version once.

`GET {server_url}/flywheel/status` returns JSON with `policy_version`. Each version not yet in the
history file is evaluated (into <output_dir>/v<version>/) and one line is appended to the history
JSONL: {"version", "time", "scores": {benchmark: score}, "run_dir"}. Restarting the watcher reads the
history first, so a version is evaluated once even across restarts. `flywheel eval plot` draws
accuracy vs version from that file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from flywheel.server.jsonl import JSONLineError, read_json_lines
from flywheel.server.status import fetch_status


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return read_json_lines(path)
    except JSONLineError as exc:
        raise ValueError(f"{exc.where}: not a JSON line") from None


def policy_version(server_url: str, timeout_s: float = 10.0) -> int:
    return fetch_status(server_url, timeout=timeout_s).policy_version


def watch(
    server_url: str,
    history: Path,
    evaluate: Callable[[int], tuple[dict[str, float], str]],
    poll_s: float = 5.0,
    max_versions: int | None = None,
    timeout_s: float | None = None,
) -> int:
    """Evaluate every new version; returns how many were evaluated. Stops after max_versions new
    ones or timeout_s seconds (None: run until interrupted)."""
    done = {h["version"] for h in read_history(history)}
    evaluated, start = 0, time.monotonic()
    while True:
        try:
            version = policy_version(server_url)
        except (httpx.HTTPError, ValueError) as exc:
            print(f"[flywheel eval --watch] status unavailable ({type(exc).__name__}: {exc}); retrying", flush=True)
            version = None
        if version is not None and version not in done:
            print(f"[flywheel eval --watch] evaluating policy version {version}", flush=True)
            scores, run_dir = evaluate(version)
            history.parent.mkdir(parents=True, exist_ok=True)
            with open(history, "a") as fh:
                fh.write(
                    json.dumps({"version": version, "time": time.time(), "scores": scores, "run_dir": run_dir}) + "\n"
                )
            done.add(version)
            evaluated += 1
        if max_versions is not None and evaluated >= max_versions:
            return evaluated
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return evaluated
        time.sleep(poll_s)


def plot_history(history: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(read_history(history), key=lambda h: h["version"])
    if not rows:
        raise ValueError(f"history {history} has no evaluations")
    benchmarks = sorted({b for h in rows for b in h["scores"]})
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for b in benchmarks:
        pts = [(h["version"], h["scores"][b]) for h in rows if b in h["scores"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
    ax.set_xlabel("policy version")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy vs policy version")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
