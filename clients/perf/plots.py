"""PNG plots of a perf run: throughput vs concurrency (closed-loop sweep) and latency CDFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flywheel.clients.perf.load import RequestResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_vs_concurrency(runs: list[dict], out: Path) -> Path:
    plt = _plt()
    runs = [r for r in runs if r.get("mode") == "closed"]
    xs = [r["parallel"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(xs, [r["output_throughput"] for r in runs], marker="o", label="output tok/s")
    ax.plot(xs, [r["total_token_throughput"] for r in runs], marker="s", label="total tok/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens / s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["ttft_ms_p50"] for r in runs], color="gray", linestyle="--", marker="^", label="TTFT p50 (ms)")
    ax2.set_ylabel("TTFT p50 (ms)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    ax.set_title("throughput vs concurrency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def latency_cdf(results_by_label: dict[str, list[RequestResult]], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, results in results_by_label.items():
        for ax, values in (
            (axes[0], [r.ttft for r in results if r.ok]),
            (axes[1], [r.latency for r in results if r.ok]),
        ):
            if values:
                v = np.sort(np.asarray(values) * 1000)
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    for ax, title in zip(axes, ("TTFT", "end-to-end latency")):
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
