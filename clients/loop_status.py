"""What the running loop looks like right now, read from where each component already publishes it.

    Redis            RolloutQueue.stats(): produced / acked / pending / lag / dead-lettered, and the
                     sampler's groups dropped as uniform (all rewards equal: no GRPO signal, never queued)
    the server       GET /flywheel/status (policy_version) and GET /metrics (vLLM's token counter, running requests)
    the trainer      run_dir/train/metrics.jsonl (step, loss, reward_mean, staleness, tokens/s, pushed version,
                     learner/server mismatch and the fractions its correction truncated or masked)
    eval             run_dir/eval/history.jsonl (score per policy version)
    production       with --production-prompts: captured (entries ever added to the capture stream), and
                     the sampler's production_sampled / _scored (_verifier, _judge) / _kept_rollouts in the
                     queue's stats; trained = the trainer's production_completions summed over its steps

`LoopStatus.sample()` returns one flat dict; `flywheel up` draws it as a rich table, appends it to
run_dir/up/status.jsonl (the report's throughput curves come from there) and the loop test reads it.
Nothing here writes to a component: a dead component shows as missing values, never an exception.

Starvation: with uniform groups dropped, a policy whose reward became constant (collapsed, or a
reward that never varies) makes the sampler drop everything and the trainer wait with no error
anywhere. `uniform_streak` counts the groups dropped since the queue last grew; from
UNIFORM_STREAK_WARNING on, the view says so in words.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from flywheel.clients.report import PRODUCTION_COUNTERS, train_rows
from flywheel.sampler.config import QueueConfig
from flywheel.sampler.queue import RolloutQueue
from flywheel.server.status import fetch_status


def last_json_line(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a file that another process is appending to."""
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 65536))
        lines = fh.read().splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line still being written
    return None


def prometheus_values(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of every sample of each named metric (over all label sets) in Prometheus text format."""
    out = {n: 0.0 for n in names}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return out


STATUS_REDIS_WAIT_S = 1.0  # a status read gives up on an unreachable Redis after this long (shown as missing)
UNIFORM_STREAK_WARNING = 32  # groups in a row with all-equal rewards before the view warns


def uniform_streak(s: dict[str, Any], mark: tuple[int, int] | None) -> tuple[int | None, tuple[int, int] | None]:
    """(groups dropped as uniform since `produced` last grew, the new mark) from one status sample.

    `mark` is (produced, dropped_uniform_groups) when produced last changed; None before the first sample."""
    produced, dropped = s.get("produced"), s.get("dropped_uniform_groups")
    if produced is None or dropped is None:
        return None, mark
    if mark is None or produced != mark[0]:
        mark = (produced, dropped)
    return dropped - mark[1], mark


def starvation_warning(s: dict[str, Any]) -> str | None:
    streak = s.get("uniform_streak")
    if streak is None or streak < UNIFORM_STREAK_WARNING:
        return None
    return (
        f"the last {streak} sampled groups all had equal rewards (no GRPO signal) and were dropped: the trainer "
        "gets nothing. Is the reward constant for this task, or did the policy collapse (lower the lr)?"
    )


class LoopStatus:
    """Polls the loop's components; keeps the previous sample to turn counters into rates."""

    def __init__(self, run_dir: Path, server_url: str, queue: QueueConfig, capture_stream: str | None = None):
        self.run_dir = Path(run_dir)
        self.capture_stream = capture_stream
        self.server_url = server_url.rstrip("/")
        # never wait for Redis here: `flywheel up` samples this between checks of its children, and a
        # status read retrying forever while Redis is down kept it from seeing Redis died and restarting it
        self.queue = RolloutQueue(
            queue.model_copy(update={"retry_for_s": STATUS_REDIS_WAIT_S}), consumer="flywheel-up-status"
        )
        self.http = httpx.Client(timeout=3.0)
        self.started = time.time()
        self._last: dict[str, Any] | None = None
        self._produced_mark: tuple[int, int] | None = None

    def _server(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            out["policy_version"] = fetch_status(self.server_url, client=self.http).policy_version
            metrics = prometheus_values(
                self.http.get(self.server_url + "/metrics").text,
                ("vllm:generation_tokens_total", "vllm:num_requests_running"),
            )
            out["server_generated_tokens"] = metrics["vllm:generation_tokens_total"]
            out["server_running_requests"] = metrics["vllm:num_requests_running"]
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        return out

    def _queue(self) -> dict[str, Any]:
        try:
            s = self.queue.stats()
        except Exception:  # Redis not up yet / already stopped
            return {}
        return {
            "produced": s["produced"],
            "acked": s["acked"],
            "pending": s["pending"],
            "lag": s["lag"],
            "backlog": s["backlog"],
            "dead_lettered": s["dead_lettered"],
            "duplicates_skipped": s["duplicates_skipped"],
            "reclaimed": s["reclaimed"],
            "dropped_uniform_groups": s["dropped_uniform_groups"],
            "dropped_uniform_rollouts": s["dropped_uniform_rollouts"],
        }

    def _production(self) -> dict[str, Any]:
        if self.capture_stream is None:
            return {}
        out: dict[str, Any] = {}
        try:
            info = self.queue.redis.xinfo_stream(self.capture_stream)
            out["production_captured"] = int(info.get("entries-added", info.get("length", 0)))
        except Exception:  # no capture yet (no such stream), Redis down
            pass
        try:
            stats = self.queue.stats()
            for key in PRODUCTION_COUNTERS:
                out[key] = stats.get(key, 0)
        except Exception:
            pass
        out["production_trained"] = sum(r.get("production_completions", 0) for r in train_rows(self.run_dir))
        return out

    def _trainer(self) -> dict[str, Any]:
        row = last_json_line(self.run_dir / "train" / "metrics.jsonl") or {}
        keys = (
            "step",
            "loss",
            "reward_mean",
            "staleness_max",
            "staleness_mean",
            "tokens_per_s",
            "pushed_version",
            "step_s",
            "mismatch_abs_mean",
            "mismatch_abs_p99",
            "mismatch_kl",
            "corrected_token_fraction",
            "masked_token_fraction",
        )
        return {("train_" + k if k not in ("step", "reward_mean") else k): row[k] for k in keys if k in row}

    def _eval(self) -> dict[str, Any]:
        row = last_json_line(self.run_dir / "eval" / "history.jsonl")
        if not row:
            return {}
        scores = row.get("scores") or {}
        return {
            "eval_version": row.get("version"),
            "eval_score": sum(scores.values()) / len(scores) if scores else None,
        }

    def sample(self) -> dict[str, Any]:
        now = time.time()
        s: dict[str, Any] = {"time": now, "elapsed_s": round(now - self.started, 1)}
        s |= self._server() | self._queue() | self._trainer() | self._eval() | self._production()
        last = self._last
        if last is not None and now > last["time"]:
            dt = now - last["time"]
            if "server_generated_tokens" in s and "server_generated_tokens" in last:
                s["server_tokens_per_s"] = max(
                    0.0, (s["server_generated_tokens"] - last["server_generated_tokens"]) / dt
                )
            if "produced" in s and "produced" in last:
                s["rollouts_per_s"] = max(0.0, (s["produced"] - last["produced"]) / dt)
        streak, self._produced_mark = uniform_streak(s, self._produced_mark)
        if streak is not None:
            s["uniform_streak"] = streak
        if "policy_version" in s and "train_pushed_version" in s:
            s["versions_behind"] = s["policy_version"] - s["train_pushed_version"]
        self._last = s
        return s

    def close(self) -> None:
        self.queue.close()
        self.http.close()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def status_table(s: dict[str, Any], title: str, children: dict[str, str]) -> Table:
    """The live view: one row per quantity, plus the state of every child process."""
    table = Table(title=title, show_header=False, min_width=60)
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [
        ("policy version (server)", _fmt(s.get("policy_version"))),
        ("trainer step / pushed", f"{_fmt(s.get('step'))} / {_fmt(s.get('train_pushed_version'))}"),
        ("rollouts produced / acked", f"{_fmt(s.get('produced'))} / {_fmt(s.get('acked'))}"),
        (
            "rollouts pending / queued / dead",
            f"{_fmt(s.get('pending'))} / {_fmt(s.get('lag'))} / {_fmt(s.get('dead_lettered'))}",
        ),
        (
            "groups dropped as uniform (rollouts)",
            f"{_fmt(s.get('dropped_uniform_groups'))} ({_fmt(s.get('dropped_uniform_rollouts'))})",
        ),
        (
            "staleness max / mean (versions)",
            f"{_fmt(s.get('train_staleness_max'))} / {_fmt(s.get('train_staleness_mean'))}",
        ),
        (
            "learner/server |dlogp| mean / p99, KL",
            f"{_fmt(s.get('train_mismatch_abs_mean'))} / {_fmt(s.get('train_mismatch_abs_p99'))}, "
            f"{_fmt(s.get('train_mismatch_kl'))}",
        ),
        (
            "tokens truncated / masked (correction)",
            f"{_fmt(s.get('train_corrected_token_fraction'))} / {_fmt(s.get('train_masked_token_fraction'))}",
        ),
        ("reward mean (last step)", _fmt(s.get("reward_mean"))),
        ("loss (last step)", _fmt(s.get("train_loss"))),
        ("tokens/s server / trainer", f"{_fmt(s.get('server_tokens_per_s'))} / {_fmt(s.get('train_tokens_per_s'))}"),
        ("last eval (version: score)", f"{_fmt(s.get('eval_version'))}: {_fmt(s.get('eval_score'))}"),
        ("elapsed", f"{s.get('elapsed_s', 0):.0f} s"),
    ]
    if "production_captured" in s or "production_sampled" in s:  # --production-prompts
        rows.insert(
            -1,
            (
                "production prompts captured / sampled / scored",
                f"{_fmt(s.get('production_captured'))} / {_fmt(s.get('production_sampled'))} / "
                f"{_fmt(s.get('production_scored'))}",
            ),
        )
        rows.insert(
            -1,
            (
                "production completions kept / trained",
                f"{_fmt(s.get('production_kept_rollouts'))} / {_fmt(s.get('production_trained'))}",
            ),
        )
    for name, value in rows:
        table.add_row(name, value)
    if warning := starvation_warning(s):
        table.add_row("[yellow]warning[/yellow]", f"[yellow]{warning}[/yellow]")
    table.add_row("processes", "  ".join(f"{k}:{v}" for k, v in children.items()))
    return table
