"""`flywheel perf` against a real tiny-model server: its metrics agree with what the server and an
independent clock say (usage token counts, exact prompt lengths, TTFT <= latency, timestamps
inside the window the test itself measured), open-loop arrivals, plots, and clear errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from flywheel.clients.perf.load import LoadTarget, closed_loop, open_loop, send_request
from flywheel.clients.perf.metrics import summarize
from flywheel.clients.perf.prompts import LocalTokenizer, ServerTokenizer, synthetic_prompts

FLYWHEEL = [sys.executable, "-m", "flywheel.clients.cli"]


def test_synthetic_prompts_are_token_exact(tiny_model, server):
    local = LocalTokenizer(str(tiny_model))
    for n in (1, 7, 64):
        for p in synthetic_prompts(local, 3, n, 4, seed=n):
            assert len(local.encode(p.text)) == n
    # the server's own count agrees with the local tokenizer's
    remote = ServerTokenizer(server.url, server.model)
    p = synthetic_prompts(remote, 1, 33, 4, seed=1)[0]
    assert len(remote.encode(p.text)) == 33 == len(local.encode(p.text))


def test_request_metrics_agree_with_usage_and_clock(tiny_model, server):
    local = LocalTokenizer(str(tiny_model))
    prompt = synthetic_prompts(local, 1, 24, 12, seed=3)[0]
    target = LoadTarget(base_url=server.base_url, model=server.model)

    async def one():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            r = await send_request(session, target, prompt)
            return t0, r, time.perf_counter()

    t0, r, t1 = asyncio.run(one())
    assert r.ok, r.error
    assert t0 <= r.start < r.start + r.ttft <= r.end <= t1
    assert r.ttft <= r.latency and r.chunk_times == sorted(r.chunk_times)
    assert r.chunk_times[0] == pytest.approx(r.start + r.ttft) and r.chunk_times[-1] <= r.end
    assert r.prompt_tokens == 24 and r.output_tokens == 12
    assert 1 <= len(r.chunk_times) <= r.output_tokens
    assert r.tpot == pytest.approx((r.latency - r.ttft) / 11)
    # the same request without streaming, through the OpenAI SDK: the same usage
    usage = (
        OpenAI(base_url=server.base_url, api_key="x")
        .completions.create(
            model=server.model, prompt=prompt.text, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .usage
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.prompt_tokens, r.output_tokens)


def test_closed_and_open_loop_summaries(tiny_model, server):
    prompts = synthetic_prompts(LocalTokenizer(str(tiny_model)), 8, 16, 6, seed=5)
    target = LoadTarget(base_url=server.base_url, model=server.model)
    wall0 = time.perf_counter()
    results, duration, overhead = asyncio.run(closed_loop(target, prompts, 4))
    wall = time.perf_counter() - wall0
    m = summarize(results, duration)
    assert m["completed"] == 8 and m["errors"] == 0 and duration <= wall
    assert m["output_tokens"] == 48 and m["input_tokens"] == 128
    assert m["output_throughput"] == pytest.approx(48 / duration)
    assert m["ttft_ms_p50"] <= m["e2e_ms_p50"] and m["ttft_ms_p99"] <= max(r.latency for r in results) * 1000 + 1e-6
    assert 0 < overhead["client_cpu_fraction"] < 1.0 and overhead["loop_lag_ms_max"] >= 0
    # open loop at 50 req/s: requests start on their own schedule, not after replies
    results, duration, _ = asyncio.run(open_loop(target, prompts, rate=50.0, seed=1))
    starts = sorted(r.start for r in results)
    assert all(r.ok for r in results) and len(results) == 8
    assert starts[-1] - starts[0] < sum(r.latency for r in results), "arrivals must overlap, not wait for replies"


def test_perf_cli_writes_results_and_plots(tiny_model, server, tmp_path):
    out = tmp_path / "perf"
    t0 = time.time()
    proc = subprocess.run(
        FLYWHEEL
        + [
            "perf",
            "--base-url",
            server.base_url,
            "--parallel",
            "1",
            "4",
            "--num-requests",
            "6",
            "--input-len",
            "20",
            "--output-len",
            "5",
            "--tokenizer",
            str(tiny_model),
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["parallel"] for r in res["runs"]] == [1, 4]
    for r in res["runs"]:
        assert r["completed"] == 6 and r["errors"] == 0 and r["output_tokens"] == 30 and r["input_tokens"] == 120
        assert r["duration_s"] < wall and r["ttft_ms_p50"] <= r["e2e_ms_p50"]
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(x["ttft"] <= x["end"] - x["start"] for x in rows)
    assert all(x["prompt_tokens"] == 20 and x["output_tokens"] == 5 for x in rows)
    for png in ("throughput_vs_concurrency.png", "latency_cdf.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "out tok/s" in proc.stdout


def test_perf_cli_open_loop_with_server_tokenizer(server, tmp_path):
    proc = subprocess.run(
        FLYWHEEL
        + [
            "perf",
            "--base-url",
            server.base_url,
            "--rate",
            "20",
            "--num-requests",
            "5",
            "--input-len",
            "12",
            "--output-len",
            "3",
            "--warmup",
            "0",
            "--no-plots",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["mode"] == "open" and run["rate"] == 20 and run["completed"] == 5 and run["input_tokens"] == 60


def test_perf_cli_dataset_prompts(server, tmp_path):
    proc = subprocess.run(
        FLYWHEEL
        + [
            "perf",
            "--base-url",
            server.base_url,
            "--dataset",
            "mmlu-dev",
            "--parallel",
            "2",
            "--num-requests",
            "4",
            "--output-len",
            "3",
            "--warmup",
            "0",
            "--no-plots",
            "--endpoint",
            "chat",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    rows = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert run["completed"] == 4 and all(r["output_tokens"] == 3 for r in rows)
    assert all(r["prompt_tokens"] > 40 for r in rows)  # real MMLU questions in the chat template, counted by the server


def test_perf_cli_unreachable_url_is_one_line_error(tmp_path):
    proc = subprocess.run(
        FLYWHEEL + ["perf", "--base-url", "http://127.0.0.1:9/v1", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("flywheel perf: error: cannot reach") and "\n" not in proc.stderr.strip()
