"""`flywheel eval compare RUN_A RUN_B`: per-benchmark deltas with paired bootstrap CIs, and flips.

Samples are paired by (benchmark, id): both runs must have scored the same item for it to count.
The CI is a paired bootstrap of the mean score difference (B - A) over the common items: resample
items with replacement, take the mean difference, report the 2.5th and 97.5th percentiles. A
'flip' is an item right in one run (score 1) and wrong in the other (score 0), or for fractional
scores (pass@1 over n samples) one whose score changed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from flywheel.clients.eval.report import read_samples


def delta_color(delta: float) -> str:
    return "green" if delta > 0 else "red" if delta < 0 else "white"


def paired_bootstrap(diffs: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    if not diffs:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def compare_runs(run_a: Path, run_b: Path, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    a = {(r["benchmark"], r["id"]): r for r in read_samples(run_a)}
    b = {(r["benchmark"], r["id"]): r for r in read_samples(run_b)}
    by_bench: dict[str, list[tuple[str, dict, dict]]] = defaultdict(list)
    for key in sorted(a.keys() & b.keys()):
        by_bench[key[0]].append((key[1], a[key], b[key]))
    out: dict[str, Any] = {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "benchmarks": {},
        "only_in_a": len(a.keys() - b.keys()),
        "only_in_b": len(b.keys() - a.keys()),
    }
    for bench, rows in by_bench.items():
        diffs = [rb["score"] - ra["score"] for _, ra, rb in rows]
        lo, hi = paired_bootstrap(diffs, resamples, seed)
        flips = [
            {
                "id": i,
                "a": ra["score"],
                "b": rb["score"],
                "reply_a": (ra["completions"] or [ra.get("error") or ""])[0],
                "reply_b": (rb["completions"] or [rb.get("error") or ""])[0],
            }
            for i, ra, rb in rows
            if ra["score"] != rb["score"]
        ]
        n = len(rows)
        out["benchmarks"][bench] = {
            "n": n,
            "score_a": sum(ra["score"] for _, ra, _ in rows) / n,
            "score_b": sum(rb["score"] for _, _, rb in rows) / n,
            "delta": sum(diffs) / n,
            "ci_low": lo,
            "ci_high": hi,
            "improved": sum(1 for f in flips if f["b"] > f["a"]),
            "regressed": sum(1 for f in flips if f["b"] < f["a"]),
            "flips": flips,
        }
    return out


def print_comparison(result: dict[str, Any], show_flips: int = 5) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width))
    table = Table(title=f"eval compare: A={result['run_a']}  B={result['run_b']}")
    for col in ("benchmark", "n", "A", "B", "B-A", "95% CI", "improved", "regressed"):
        table.add_column(col, justify="right" if col != "benchmark" else "left")
    for bench, v in result["benchmarks"].items():
        significant = v["ci_low"] > 0 or v["ci_high"] < 0
        table.add_row(
            bench,
            str(v["n"]),
            f"{v['score_a']:.4f}",
            f"{v['score_b']:.4f}",
            f"[{'bold ' if significant else ''}{delta_color(v['delta'])}]{v['delta']:+.4f}[/]",
            f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
            str(v["improved"]),
            str(v["regressed"]),
        )
    console.print(table)
    for bench, v in result["benchmarks"].items():
        for f in v["flips"][:show_flips]:
            console.print(
                f"  {bench} {f['id']}: {f['a']:.2f} -> {f['b']:.2f}  A: {str(f['reply_a'])[:70]!r}  B: "
                f"{str(f['reply_b'])[:70]!r}",
                markup=False,
                highlight=False,
            )
    if result["only_in_a"] or result["only_in_b"]:
        console.print(f"unpaired items: {result['only_in_a']} only in A, {result['only_in_b']} only in B (left out)")
