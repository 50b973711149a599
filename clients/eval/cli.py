"""`flywheel eval`: accuracy of any OpenAI-compatible endpoint on offline benchmarks.

    flywheel eval --base-url http://127.0.0.1:8000/v1 --benchmarks gsm8k-style mmlu-dev --limit 50
    flywheel eval --benchmarks custom:my.jsonl --custom-scorer math_verify
    flywheel eval --config mix.yaml          # collections: {mix: {gsm8k-style: 0.5, mmlu-dev: 0.5}}
    flywheel eval --watch --history runs/history.jsonl
    flywheel eval compare RUN_A RUN_B
    flywheel eval plot --history runs/history.jsonl

A run directory holds samples.jsonl, summary.json, scores.png and report.html (clients.eval.report).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from flywheel.clients.endpoint import served_model
from flywheel.clients.eval.datasets import LOADERS, DatasetError, EvalItem, load_benchmark, load_collection
from flywheel.server.errors import UserError


class Config(BaseModel):
    """Evaluate an OpenAI-compatible endpoint on offline benchmarks."""

    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="OpenAI API base URL (ends in /v1)")
    model: str | None = Field(default=None, description="Model name to request (default: the first of GET /v1/models)")
    api_key: str = Field(default="EMPTY", description="Bearer token sent to the endpoint")
    benchmarks: list[str] = Field(
        default_factory=lambda: ["gsm8k-style"],
        description=f"Benchmarks: {', '.join(LOADERS)}, custom:PATH.jsonl, or a name from `collections`",
    )
    collections: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Weighted mixes: {name: {benchmark: weight}}; --limit is the mix's size"
    )
    custom_scorer: str = Field(
        default="exact_match",
        description="Scorer for custom JSONL lines without a 'scorer' key (a sampler.rewards name)",
    )
    limit: int | None = Field(
        default=None, description="Items per benchmark (spread evenly over the benchmark); collections default to 100"
    )
    prompt_format: Literal["chat", "completion"] = Field(
        default="chat",
        description="chat: /v1/chat/completions (server's chat template); completion: raw text to /v1/completions",
    )
    chat_template: Path | None = Field(
        default=None, description="Jinja chat template file sent with each chat request (vLLM's `chat_template`)"
    )
    system_prompt: str | None = Field(default=None, description="System message (chat) or preamble (completion)")
    num_fewshot: int = Field(
        default=0, description="Few-shot examples prepended (from the benchmark's own exemplars, never the item)"
    )
    max_tokens: int = Field(default=256, description="Max new tokens per reply")
    temperature: float = Field(default=0.0, description="Sampling temperature")
    top_p: float = Field(default=1.0, description="Nucleus sampling")
    seed: int | None = Field(default=0, description="Sampling seed sent with each request (None: unseeded)")
    n_samples: int = Field(default=1, description="Replies per generative item (pass@k needs n_samples >= k)")
    pass_k: list[int] = Field(default_factory=lambda: [1], description="k values reported for HumanEval pass@k")
    concurrency: int = Field(default=8, description="Max requests in flight")
    timeout_s: float = Field(default=300.0, description="Per-request timeout in seconds")
    output_dir: Path | None = Field(default=None, description="Run directory (default runs/eval/<timestamp>)")
    watch: bool = Field(
        default=False, description="Poll GET {server_url}/flywheel/status and evaluate each new policy_version once"
    )
    server_url: str | None = Field(default=None, description="Server root for --watch (default: base_url without /v1)")
    history: Path = Field(
        default=Path("runs/eval/history.jsonl"), description="History JSONL appended by --watch (one line per version)"
    )
    poll_s: float = Field(default=5.0, description="Seconds between status polls (--watch)")
    max_versions: int | None = Field(default=None, description="Stop --watch after this many new versions")
    watch_timeout_s: float | None = Field(default=None, description="Stop --watch after this many seconds")


def spread(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """`limit` items spread evenly over the benchmark (all tasks/subjects), deterministic."""
    if limit is None or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def load_items(config: Config) -> dict[str, list[EvalItem]]:
    out = {}
    for name in config.benchmarks:
        try:
            if name in config.collections:
                out[name] = load_collection(
                    name, config.collections[name], config.limit or 100, config.seed or 0, config.custom_scorer
                )
            else:
                out[name] = spread(load_benchmark(name, config.custom_scorer), config.limit)
        except DatasetError as exc:
            raise UserError(str(exc)) from None
    return out


def evaluate(config: Config, model: str, out_dir: Path, items: dict[str, list[EvalItem]]) -> dict:
    from flywheel.clients.eval.report import write_run
    from flywheel.clients.eval.runner import QuerySettings, grade, query_all

    settings = QuerySettings(
        base_url=config.base_url,
        model=model,
        api_key=config.api_key,
        prompt_format=config.prompt_format,
        chat_template=config.chat_template.read_text() if config.chat_template else None,
        system_prompt=config.system_prompt,
        num_fewshot=config.num_fewshot,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        n=config.n_samples,
        concurrency=config.concurrency,
        timeout_s=config.timeout_s,
    )
    samples = {}
    for name, xs in items.items():
        samples[name] = asyncio.run(query_all(xs, settings, desc=name))
        grade(samples[name])
    record = config.model_dump(mode="json") | {"model": model, "output_dir": str(out_dir)}
    summary = write_run(out_dir, samples, record, config.pass_k)
    _print_summary(summary, out_dir)
    return summary


def _print_summary(summary: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"flywheel eval -> {out_dir}")
    for col in ("benchmark", "metric", "score", "± 95%", "n", "errors"):
        table.add_column(col)
    for b, v in summary["benchmarks"].items():
        table.add_row(b, v["metric"], f"{v['score']:.4f}", f"{1.96 * v['stderr']:.4f}", str(v["n"]), str(v["errors"]))
    Console(width=max(120, Console().width)).print(table)


def run(config: Config) -> int:
    if config.chat_template is not None and not config.chat_template.is_file():
        raise UserError(f"chat template file not found: {config.chat_template}")
    if config.n_samples < max(config.pass_k):
        raise UserError(f"--n-samples {config.n_samples} is smaller than the largest --pass-k {max(config.pass_k)}")
    items = load_items(config)  # bad benchmark names fail before any request
    model = served_model(config.base_url, config.model, config.api_key)
    base_dir = config.output_dir or Path("runs/eval") / time.strftime("%Y%m%d-%H%M%S")
    if not config.watch:
        summary = evaluate(config, model, base_dir, items)
        return 1 if all(v["errors"] == v["n"] for v in summary["benchmarks"].values()) else 0

    from flywheel.clients.eval.watch import watch

    server_url = config.server_url or config.base_url.rstrip("/").removesuffix("/v1")

    def one_version(version: int) -> tuple[dict[str, float], str]:
        out = base_dir / f"v{version}"
        summary = evaluate(config, model, out, items)
        return {b: v["score"] for b, v in summary["benchmarks"].items()}, str(out)

    watch(server_url, config.history, one_version, config.poll_s, config.max_versions, config.watch_timeout_s)
    return 0


# ---------------------------------------------------------------- compare / plot


class CompareConfig(BaseModel):
    """Compare two eval runs: per-benchmark deltas with paired bootstrap CIs and flipped samples."""

    runs: list[Path] = Field(
        default_factory=list, description="Two run directories: RUN_A RUN_B", json_schema_extra={"positional": True}
    )
    resamples: int = Field(default=2000, description="Bootstrap resamples")
    seed: int = Field(default=0, description="Bootstrap seed")
    show_flips: int = Field(default=5, description="Flipped samples printed per benchmark")
    output: Path | None = Field(default=None, description="Also write the comparison (with every flip) as JSON here")


def run_compare(config: CompareConfig) -> int:
    """Compare two eval runs: per-benchmark deltas with paired bootstrap CIs and flipped samples."""
    from flywheel.clients.eval.compare import compare_runs, print_comparison

    if len(config.runs) != 2:
        raise UserError(f"give exactly two run directories (RUN_A RUN_B), got {len(config.runs)}")
    try:
        result = compare_runs(config.runs[0], config.runs[1], config.resamples, config.seed)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        raise UserError(str(exc)) from None
    if not result["benchmarks"]:
        raise UserError("the two runs share no (benchmark, id) items")
    print_comparison(result, config.show_flips)
    if config.output:
        config.output.write_text(json.dumps(result, indent=2, default=str))
    return 0


class PlotConfig(BaseModel):
    """Draw accuracy vs policy version from a --watch history file."""

    history: Path = Field(
        default=Path("runs/eval/history.jsonl"), description="History JSONL written by `flywheel eval --watch`"
    )
    output: Path | None = Field(
        default=None, description="PNG to write (default: next to the history, accuracy_vs_version.png)"
    )


def run_plot(config: PlotConfig) -> int:
    """Draw accuracy vs policy version (PNG) from the --watch history."""
    from flywheel.clients.eval.watch import plot_history

    if not config.history.is_file():
        raise UserError(f"history file not found: {config.history}")
    try:
        out = plot_history(config.history, config.output or config.history.with_name("accuracy_vs_version.png"))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(out)
    return 0


SUBCOMMANDS = {"compare": (CompareConfig, run_compare), "plot": (PlotConfig, run_plot)}
