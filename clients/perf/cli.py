"""`flywheel perf`: load-test any OpenAI-compatible endpoint.

    flywheel perf --base-url http://127.0.0.1:8000/v1 --parallel 1 4 16 64 --input-len 128 --output-len 64
    flywheel perf --rate 2 8 --num-requests 100            # open loop: Poisson arrivals at 2 and 8 req/s
    flywheel perf --dataset gsm8k-style --output-len 128   # benchmark prompts instead of synthetic ones

Writes <output_dir>/results.json (one flat dict of metrics per run, plus the client's own overhead),
requests.jsonl (every request's timestamps and token counts), throughput_vs_concurrency.png and
latency_cdf.png, and prints a table.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from flywheel.clients.endpoint import served_model
from flywheel.clients.perf.load import LoadTarget, RequestResult, closed_loop, open_loop, send_request
from flywheel.clients.perf.metrics import summarize
from flywheel.clients.perf.prompts import LocalTokenizer, Prompt, ServerTokenizer, dataset_prompts, synthetic_prompts
from flywheel.server.errors import UserError


class Config(BaseModel):
    """Load-test an OpenAI-compatible endpoint: closed-loop concurrency sweep or open-loop Poisson arrivals."""

    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="OpenAI API base URL (ends in /v1)")
    model: str | None = Field(default=None, description="Model name (default: the first of GET /v1/models)")
    endpoint: Literal["completions", "chat"] = Field(
        default="completions", description="Stream from /v1/completions or /v1/chat/completions"
    )
    parallel: list[int] = Field(
        default_factory=lambda: [1, 4, 16, 64], description="Closed loop: concurrent requests, one run per value"
    )
    rate: list[float] = Field(
        default_factory=list,
        description="Open loop: Poisson arrival rates in requests/s, one run per value (replaces the sweep)",
    )
    max_concurrency: int | None = Field(default=None, description="Open loop: cap on requests in flight (None: no cap)")
    num_requests: int | None = Field(
        default=None, description="Requests per run (default: max(16, 4 x parallel) closed, 64 open)"
    )
    input_len: int = Field(
        default=128, description="Synthetic prompt length in tokens (exact, by the served model's tokenizer)"
    )
    output_len: int = Field(default=64, description="Tokens to generate per request (max_tokens)")
    ignore_eos: bool = Field(
        default=True, description="Send vLLM's ignore_eos so every reply has exactly output_len tokens"
    )
    dataset: str | None = Field(
        default=None,
        description="Use a benchmark's prompts (flywheel eval names, custom:PATH) instead of synthetic ones",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Local HF tokenizer folder of the served model (default: the server's /tokenize route)",
    )
    temperature: float = Field(default=0.0, description="Sampling temperature")
    seed: int = Field(default=0, description="Seed for prompts and arrival times")
    warmup: int = Field(default=2, description="Requests sent (and not measured) before the first run")
    timeout_s: float = Field(default=600.0, description="Per-request timeout in seconds")
    output_dir: Path | None = Field(default=None, description="Where results go (default runs/perf/<timestamp>)")
    plots: bool = Field(default=True, description="Write PNG plots")


def build_prompts(config: Config, model: str, num: int) -> list[Prompt]:
    if config.dataset:
        return dataset_prompts(config.dataset, num, config.output_len, config.seed)
    if config.tokenizer:
        if (
            not (Path(config.tokenizer) / "tokenizer_config.json").is_file()
            and not (Path(config.tokenizer) / "tokenizer.json").is_file()
        ):
            raise UserError(f"--tokenizer {config.tokenizer} is not an HF tokenizer folder")
        tok = LocalTokenizer(config.tokenizer)
    else:
        server = config.base_url.rstrip("/").removesuffix("/v1")
        tok = ServerTokenizer(server, model)
        try:
            tok.encode("probe")
        except httpx.HTTPError as exc:
            raise UserError(f"the server has no usable /tokenize route ({exc}); pass --tokenizer PATH") from None
    return synthetic_prompts(tok, num, config.input_len, config.output_len, config.seed)


def run_all(config: Config, target: LoadTarget) -> tuple[list[dict], dict[str, list[RequestResult]]]:
    plans = [("open", r) for r in config.rate] or [("closed", p) for p in config.parallel]
    sizes = [config.num_requests or (64 if mode == "open" else max(16, 4 * int(x))) for mode, x in plans]
    prompts = build_prompts(config, target.model, max(sizes) + config.warmup)  # built before any clock starts

    async def go() -> tuple[list[dict], dict[str, list[RequestResult]]]:
        if config.warmup:
            await closed_loop(target, prompts[: config.warmup], min(config.warmup, 4))
        runs, by_label = [], {}
        for (mode, x), n in zip(plans, sizes):
            batch = prompts[config.warmup : config.warmup + n]
            if mode == "closed":
                results, duration, overhead = await closed_loop(target, batch, int(x))
                label, head = f"parallel={int(x)}", {"mode": "closed", "parallel": int(x)}
            else:
                results, duration, overhead = await open_loop(target, batch, x, config.seed, config.max_concurrency)
                label, head = f"rate={x:g}/s", {"mode": "open", "rate": x}
            metrics = head | summarize(results, duration) | overhead
            runs.append(metrics)
            by_label[label] = results
            print(
                f"[flywheel perf] {label}: {metrics['output_throughput']:.1f} output tok/s, "
                f"TTFT p50 {metrics['ttft_ms_p50']:.1f} ms, {metrics['errors']} errors, client CPU "
                f"{100 * metrics['client_cpu_fraction']:.1f}%",
                file=sys.stderr,
                flush=True,
            )
        return runs, by_label

    return asyncio.run(go())


def print_table(runs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="flywheel perf")
    cols = [
        ("run", None),
        ("req/s", "request_throughput"),
        ("out tok/s", "output_throughput"),
        ("tot tok/s", "total_token_throughput"),
        ("TTFT p50", "ttft_ms_p50"),
        ("TTFT p99", "ttft_ms_p99"),
        ("TPOT p50", "tpot_ms_p50"),
        ("ITL p50", "itl_ms_p50"),
        ("e2e p50", "e2e_ms_p50"),
        ("e2e p99", "e2e_ms_p99"),
        ("errors", "errors"),
        ("client CPU", "client_cpu_fraction"),
        ("loop lag p99", "loop_lag_ms_p99"),
    ]
    for name, _ in cols:
        table.add_column(name, justify="right")
    for r in runs:
        cells = [f"parallel {r['parallel']}" if r["mode"] == "closed" else f"rate {r['rate']:g}/s"]
        for _, key in cols[1:]:
            v = r[key]
            cells.append(
                f"{100 * v:.1f}%" if key == "client_cpu_fraction" else str(v) if isinstance(v, int) else f"{v:.1f}"
            )
        table.add_row(*cells)
    Console(width=max(160, Console().width)).print(table)
    print("times in ms; TPOT excludes the first token; client CPU = the load generator's own CPU time / wall time")


def run(config: Config) -> int:
    if config.input_len < 1 or config.output_len < 1:
        raise UserError("--input-len and --output-len must be >= 1")
    if any(p < 1 for p in config.parallel) or any(r <= 0 for r in config.rate):
        raise UserError("--parallel values must be >= 1 and --rate values > 0")
    model = served_model(config.base_url, config.model)
    target = LoadTarget(
        base_url=config.base_url,
        model=model,
        endpoint=config.endpoint,
        ignore_eos=config.ignore_eos,
        temperature=config.temperature,
        timeout_s=config.timeout_s,
    )
    runs, by_label = run_all(config, target)
    out_dir = config.output_dir or Path("runs/perf") / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "command": " ".join(["flywheel", "perf", *sys.argv[2:]]) if sys.argv[1:2] == ["perf"] else "flywheel perf",
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "model": model,
        "settings": config.model_dump(mode="json"),
        "runs": runs,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    with open(out_dir / "requests.jsonl", "w") as fh:
        for label, rs in by_label.items():
            for r in rs:
                fh.write(json.dumps({"run": label, **asdict(r)}) + "\n")
    if config.plots:
        from flywheel.clients.perf.plots import latency_cdf, throughput_vs_concurrency

        if any(r["mode"] == "closed" for r in runs):
            throughput_vs_concurrency(runs, out_dir / "throughput_vs_concurrency.png")
        latency_cdf(by_label, out_dir / "latency_cdf.png")
    print_table(runs)
    print(f"results: {out_dir / 'results.json'}")
    return 1 if all(r["completed"] == 0 for r in runs) else 0


__all__ = ["Config", "run", "send_request"]
