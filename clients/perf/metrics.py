"""Per-run metrics from request results: throughputs, TTFT, TPOT, ITL, e2e latency percentiles.

Definitions (the same as vLLM's serving benchmark, so the two can be compared):
    duration              first send to last reply end, seconds
    request_throughput    completed requests / duration
    output_throughput     completion tokens (server usage) / duration
    total_token_throughput (prompt + completion tokens) / duration
    ttft                  send to the first streamed chunk with tokens
    tpot                  (latency - ttft) / (output_tokens - 1): per token after the first
    itl                   gaps between successive token chunks, pooled over requests
    e2e                   send to the end of the stream
Times are reported in milliseconds, with mean and p50/p90/p95/p99.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flywheel.clients.perf.load import RequestResult

PERCENTILES = (50, 90, 95, 99)


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {f"{name}_ms_mean": float("nan"), **{f"{name}_ms_p{p}": float("nan") for p in PERCENTILES}}
    arr = np.asarray(values_s) * 1000.0
    return {
        f"{name}_ms_mean": float(arr.mean()),
        **{f"{name}_ms_p{p}": float(np.percentile(arr, p)) for p in PERCENTILES},
    }


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    out: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "duration_s": duration_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0,
    }
    out |= _stats("ttft", [r.ttft for r in ok])
    out |= _stats("tpot", [t for r in ok if (t := r.tpot) is not None])
    out |= _stats("itl", [g for r in ok for g in r.itl])
    out |= _stats("e2e", [r.latency for r in ok])
    if errors:
        out["first_error"] = errors[0]
    return out
