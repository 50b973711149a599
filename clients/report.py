"""`flywheel report RUN_DIR`: one self-contained HTML page of a `flywheel up` run (PNGs embedded).

Reads only files the components already write:
    train/metrics.jsonl   reward and loss per step, trainer tokens/s, staleness, learner/server mismatch
    eval/history.jsonl    held-out score per policy version
    up/status.jsonl       the live view's samples: rollouts produced, server tokens/s and busy-ness over time
    up/final.json         the queue accounting at the end
Works on a run that is still going (a partial report) and on one that never got far (missing
sections say so instead of failing).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from flywheel.server.errors import UserError
from flywheel.server.jsonl import read_json_lines


class Config(BaseModel):
    """Write the HTML report of a `flywheel up` run directory."""

    run_dir: Path = Field(
        default=Path("runs/loop"),
        description="Run directory written by `flywheel up`",
        json_schema_extra={"positional": True},
    )
    output: Path | None = Field(default=None, description="HTML file to write (default: RUN_DIR/report.html)")


# the sampler's counters of production prompts in the queue's stats (sampler/grpo.py)
PRODUCTION_COUNTERS = (
    "production_sampled",
    "production_scored",
    "production_scored_verifier",
    "production_scored_judge",
    "production_kept_rollouts",
)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a file a running component appends to (a half-written last line is skipped); [] before it exists."""
    return read_json_lines(path, skip_bad=True) if path.is_file() else []


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Trainer metrics, one row per step (a resumed run re-logs steps after its checkpoint: keep the last)."""
    by_step = {r["step"]: r for r in read_jsonl(Path(run_dir) / "train" / "metrics.jsonl") if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def loop_summary(run_dir: Path) -> dict[str, Any]:
    """Throughput and accounting of a run: what the report's table and bench/loop_throughput.py print."""
    run_dir = Path(run_dir)
    status = [s for s in read_jsonl(run_dir / "up" / "status.jsonl") if "time" in s]
    steps = train_rows(run_dir)
    final = json.loads((run_dir / "up" / "final.json").read_text()) if (run_dir / "up" / "final.json").is_file() else {}
    out: dict[str, Any] = {"steps": steps[-1]["step"] if steps else 0}
    if len(status) >= 2:
        seconds = status[-1]["time"] - status[0]["time"]
        stepped = [s["step"] for s in status if s.get("step") is not None]
        produced = [s["produced"] for s in status if s.get("produced") is not None]
        out["seconds"] = round(seconds, 1)
        if seconds > 0 and stepped:
            out["optimizer_steps_per_hour"] = round((stepped[-1] - (status[0].get("step") or 0)) / seconds * 3600, 1)
        if seconds > 0 and produced:
            out["rollouts_per_s"] = round((produced[-1] - produced[0]) / seconds, 3)
        busy = [s["server_running_requests"] > 0 for s in status if s.get("server_running_requests") is not None]
        if busy:
            out["server_busy_fraction"] = round(sum(busy) / len(busy), 3)
        out["server_tokens_per_s"] = _mean(
            [s["server_tokens_per_s"] for s in status if s.get("server_tokens_per_s") is not None]
        )
    out["trainer_tokens_per_s"] = _mean([r["tokens_per_s"] for r in steps if r.get("tokens_per_s")])
    rewards = [r["reward_mean"] for r in steps if r.get("reward_mean") is not None]
    if rewards:
        k = max(1, len(rewards) // 4)
        out["reward_first_quarter"] = _mean(rewards[:k])
        out["reward_last_quarter"] = _mean(rewards[-k:])
    for key in (
        "policy_version",
        "produced",
        "acked",
        "pending",
        "lag",
        "dead_lettered",
        "duplicates_skipped",
        "dropped_uniform_groups",
        "dropped_uniform_rollouts",
    ):
        if key in final:
            out[key] = final[key]
    if all(k in final for k in ("produced", "acked", "duplicates_skipped", "pending", "lag", "dead_lettered")):
        out["accounting_balanced"] = final["produced"] == (
            final["acked"] + final["duplicates_skipped"] + final["pending"] + final["lag"] + final["dead_lettered"]
        )
    out["dropped_stale"] = sum(r.get("dropped_stale", 0) for r in steps)
    # the learner's own selection (trainer/rollout_selection.py), where configured
    for key in ("dropped_overlong", "overlong_penalised", "dynamic_dropped_groups", "dynamic_dropped_rollouts"):
        if any(key in r for r in steps):
            out[key] = sum(r.get(key, 0) for r in steps)
    # --production-prompts: captured, sampled, scored (by the verifier / the judge), kept, trained
    for key in ("production_captured", *PRODUCTION_COUNTERS):
        if key in final:
            out[key] = final[key]
    if any("production_completions" in r for r in steps) or "production_captured" in final:
        out["production_trained"] = sum(r.get("production_completions", 0) for r in steps)
    history = sorted(read_jsonl(run_dir / "eval" / "history.jsonl"), key=lambda h: h.get("version", 0))
    if history:
        out["eval_first"] = {"version": history[0]["version"], "scores": history[0]["scores"]}
        out["eval_last"] = {"version": history[-1]["version"], "scores": history[-1]["scores"]}
    return out


def lag_keys(rows: list[dict[str, Any]], prefix: str) -> list[str]:
    """The per-lag metric keys (prefix + lag) that appear in any row, by lag."""
    lags = {int(k[len(prefix) :]) for r in rows for k in r if k.startswith(prefix) and k[len(prefix) :].isdigit()}
    return [f"{prefix}{lag}" for lag in sorted(lags)]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(run_dir: Path) -> list[tuple[str, str]]:
    """(title, base64 PNG) of every curve there is data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    steps = train_rows(run_dir)
    for title, keys in (
        ("Reward (mean of the step's completions)", ["reward_mean"]),
        ("Loss", ["loss"]),
        ("Trainer tokens/s", ["tokens_per_s"]),
        ("Staleness of trained rollouts (versions)", ["staleness_max", "staleness_mean"]),
        ("Learner vs server |log p| mismatch", ["mismatch_abs_mean", "mismatch_abs_p99"]),
        ("KL(server || learner) per token, by version lag", ["mismatch_kl", *lag_keys(steps, "mismatch_kl_lag")]),
        ("Tokens truncated / masked by the correction", ["corrected_token_fraction", "masked_token_fraction"]),
    ):
        series = [(k, [(r["step"], r[k]) for r in steps if r.get(k) is not None]) for k in keys]
        series = [(k, pts) for k, pts in series if pts]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k, pts in series:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        out.append((title, _png(fig)))
        plt.close(fig)
    history = sorted(read_jsonl(run_dir / "eval" / "history.jsonl"), key=lambda h: h.get("version", 0))
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for bench in sorted({b for h in history for b in h.get("scores", {})}):
            pts = [(h["version"], h["scores"][bench]) for h in history if bench in h.get("scores", {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=bench)
        ax.set_xlabel("policy version")
        ax.set_ylabel("score")
        ax.set_title("Held-out eval per policy version")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        out.append(("Eval per version", _png(fig)))
        plt.close(fig)
    status = [s for s in read_jsonl(run_dir / "up" / "status.jsonl") if "time" in s]
    if status:
        t0 = status[0]["time"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
        pts = [(s["time"] - t0, s["produced"], s.get("acked", 0)) for s in status if s.get("produced") is not None]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label="produced")
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], label="acked")
        axes[0].set_title("Rollouts")
        axes[0].set_xlabel("seconds")
        axes[0].legend()
        tps = [(s["time"] - t0, s["server_tokens_per_s"]) for s in status if s.get("server_tokens_per_s") is not None]
        axes[1].plot([p[0] for p in tps], [p[1] for p in tps])
        axes[1].set_title("Server generated tokens/s")
        axes[1].set_xlabel("seconds")
        for ax in axes:
            ax.grid(alpha=0.3)
        out.append(("Throughput over time", _png(fig)))
        plt.close(fig)
    return out


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    summary = loop_summary(run_dir)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v) if isinstance(v, dict) else str(v))}</td></tr>"
        for k, v in summary.items()
    )
    figures = (
        "".join(
            f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(t)}">'
            f"<figcaption>{html.escape(t)}</figcaption></figure>"
            for t, b64 in _plots(run_dir)
        )
        or "<p>No metrics yet.</p>"
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>flywheel report: {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left}}figure{{display:inline-block;margin:8px}}</style></head>
<body><h1>flywheel run {html.escape(str(run_dir))}</h1><h2>Summary</h2><table>{rows}</table>
<p>Accounting (from up/final.json, written when the loop ends by itself):
produced = acked + duplicates_skipped + pending + lag (queued, never delivered) + dead_lettered;
stale rollouts are acked with the step that dropped them (dropped_stale), and so are those the learner
leaves out as overlong (dropped_overlong) or, with grpo.dynamic_sampling, as groups without reward spread
(dynamic_dropped_rollouts).
Groups whose rewards were all equal (no GRPO signal) are dropped by the sampler before the queue:
rollouts scored = produced + dropped_uniform_rollouts.</p>
<h2>Curves</h2>{figures}</body></html>"""
    out = output or run_dir / "report.html"
    out.write_text(page)
    return out


def run(config: Config) -> int:
    if not config.run_dir.is_dir():
        raise UserError(f"run directory not found: {config.run_dir}")
    print(write_report(config.run_dir, config.output))
    return 0
