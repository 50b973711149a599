"""What an eval run leaves behind: samples.jsonl, summary.json, scores.png and report.html.

    samples.jsonl  one record per item: prompt as sent, replies, answer, each reply's Reward, score
    summary.json   per benchmark: metric, score, n, stderr (+ pass@k, errors); settings; policy version
    report.html    the summary table, the bar chart (PNG embedded) and a few failed samples per benchmark

A collection's score is the weighted mean of its members' accuracies (weights as given), so a mix
stays comparable when one member has more items than its weight.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from flywheel.clients.eval.runner import Sample, pass_at_k
from flywheel.server.jsonl import read_json_lines


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summarize_benchmark(samples: list[Sample], pass_k: list[int]) -> dict[str, Any]:
    scores = [s.score for s in samples]
    out: dict[str, Any] = {
        "n": len(samples),
        "score": sum(scores) / max(1, len(scores)),
        "stderr": _stderr(scores),
        "errors": sum(1 for s in samples if s.error),
    }
    item = samples[0].item if samples else None
    out["metric"] = {
        "loglikelihood_choice": "accuracy (log-likelihood)",
        "code_exec": "pass@1",
        "ifbench": "prompt-level strict accuracy",
    }.get(item.scorer if item else "", "accuracy")
    n_rep = max((len(s.rewards) for s in samples), default=0)
    if item is not None and item.scorer == "code_exec":
        for k in pass_k:
            if k <= n_rep:
                out[f"pass@{k}"] = sum(
                    pass_at_k(len(s.rewards), sum(r["value"] >= 1.0 for r in s.rewards), k) for s in samples
                ) / len(samples)
    if item is not None and item.scorer == "ifbench":
        accs = [r["details"]["instruction_accuracy"] for s in samples for r in s.rewards[:1]]
        out["instruction_accuracy"] = sum(accs) / max(1, len(accs))
        out["unverifiable_samples"] = sum(1 for s in samples for r in s.rewards[:1] if r["details"].get("unverifiable"))
    members = {s.item.meta.get("member") for s in samples} - {None}
    if members:  # a collection: weighted mean of the members' accuracies
        by_member: dict[str, list[Sample]] = defaultdict(list)
        for s in samples:
            by_member[s.item.meta["member"]].append(s)
        weights = {m: xs[0].item.meta["member_weight"] for m, xs in by_member.items()}
        out["members"] = {
            m: {"n": len(xs), "score": sum(x.score for x in xs) / len(xs), "weight": weights[m]}
            for m, xs in by_member.items()
        }
        out["score"] = sum(v["score"] * v["weight"] for v in out["members"].values()) / sum(weights.values())
        out["metric"] = "weighted accuracy"
    return out


def summarize(
    samples_by_benchmark: dict[str, list[Sample]], settings: dict[str, Any], pass_k: list[int]
) -> dict[str, Any]:
    versions = sorted(
        {s.policy_version for xs in samples_by_benchmark.values() for s in xs if s.policy_version is not None}
    )
    return {
        "benchmarks": {b: summarize_benchmark(xs, pass_k) for b, xs in samples_by_benchmark.items()},
        "policy_versions": versions,
        "settings": settings,
    }


def bar_chart_png(summary: dict[str, Any], title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["benchmarks"])
    scores = [summary["benchmarks"][b]["score"] for b in names]
    errs = [1.96 * summary["benchmarks"][b]["stderr"] for b in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names) + 2), 3.6))
    bars = ax.bar(names, scores, yerr=errs, capsize=4, color="#4C72B0")
    for bar, v in zip(bars, scores):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.02, f"{v:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score (95% CI)")
    ax.set_title(title or "Flywheel eval")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _html(summary: dict[str, Any], png: bytes, samples_by_benchmark: dict[str, list[Sample]]) -> str:
    s = summary["settings"]
    rows = "".join(
        f"<tr><td>{html.escape(b)}</td><td>{html.escape(v['metric'])}</td><td>{v['score']:.4f}</td>"
        f"<td>±{1.96 * v['stderr']:.4f}</td>"
        f"<td>{v['n']}</td><td>{v['errors']}</td></tr>"
        for b, v in summary["benchmarks"].items()
    )
    fails = []
    for b, xs in samples_by_benchmark.items():
        wrong = [x for x in xs if x.score < 1.0][:3]
        for x in wrong:
            reply = x.error or (x.completions[0] if x.completions else "")
            fails.append(
                f"<tr><td>{html.escape(b)}</td><td>{html.escape(x.item.id)}</td><td><pre>{html.escape(x.item.prompt[:600])}</pre></td>"
                f"<td><pre>{html.escape(str(reply)[:600])}</pre></td><td>{html.escape(str(x.item.answer)[:200])}</td></tr>"
            )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Flywheel eval: {html.escape(str(s.get("model")))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
pre{{white-space:pre-wrap;max-width:40em;margin:0}}</style></head><body>
<h1>Flywheel eval</h1>
<p>model <b>{html.escape(str(s.get("model")))}</b> at {html.escape(str(s.get("base_url")))};
policy versions {summary["policy_versions"] or "n/a"}; format {html.escape(str(s.get("prompt_format")))},
{s.get("num_fewshot")}-shot, temperature {s.get("temperature")}, seed {s.get("seed")}</p>
<table><tr><th>benchmark</th><th>metric</th><th>score</th><th>95% CI</th><th>n</th><th>errors</th></tr>{rows}</table>
<p><img alt="scores" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>
<h2>Some failed samples</h2>
<table><tr><th>benchmark</th><th>id</th><th>prompt</th><th>reply</th><th>answer</th></tr>{"".join(fails)}</table>
</body></html>"""


def write_run(
    out_dir: Path, samples_by_benchmark: dict[str, list[Sample]], settings: dict[str, Any], pass_k: list[int]
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "w") as fh:
        for xs in samples_by_benchmark.values():
            for x in xs:
                fh.write(json.dumps(x.to_record(), default=str) + "\n")
    summary = summarize(samples_by_benchmark, settings, pass_k)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    png = bar_chart_png(summary, f"{settings.get('model')}")
    (out_dir / "scores.png").write_bytes(png)
    (out_dir / "report.html").write_text(_html(summary, png, samples_by_benchmark))
    return summary


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an eval run (no samples.jsonl)")
    return read_json_lines(path)
