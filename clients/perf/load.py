"""The load generator: one asyncio event loop, aiohttp streaming, closed-loop or Poisson open-loop.

Each request streams from /v1/completions (or /v1/chat/completions) and records wall-clock times
with `time.perf_counter()` at send, at every chunk that carries tokens, and at the end; token counts
come from the server's `usage` (stream_options.include_usage), not from counting chunks, so a chunk
that carries several tokens does not skew TPOT.

The generator must not be the bottleneck: nothing blocks the loop (prompts are built before the
clock starts), and `OverheadMonitor` measures the loop's own lag and the process's CPU use while
the load runs, so a saturated client shows up in the results instead of hiding in them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from flywheel.clients.perf.prompts import Prompt


@dataclass
class RequestResult:
    ok: bool
    start: float  # perf_counter at send
    end: float = 0.0
    ttft: float = 0.0  # seconds to the first chunk with tokens
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of every chunk with tokens
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first one."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class LoadTarget:
    base_url: str  # ends in /v1
    model: str
    endpoint: str = "completions"  # or "chat"
    ignore_eos: bool = True  # vLLM extension: generate exactly max_tokens
    temperature: float = 0.0
    timeout_s: float = 600.0


def request_payload(target: LoadTarget, prompt: Prompt) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": prompt.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
        return target.base_url.rstrip("/") + "/chat/completions", body
    body["prompt"] = prompt.text
    return target.base_url.rstrip("/") + "/completions", body


def _is_token_chunk(chunk: dict[str, Any]) -> bool:
    """A chunk that carries generated tokens (the last, usage-only chunk has no choices). Its text may
    be empty when a token is half of a UTF-8 character; it is still a token arriving, as vLLM's
    benchmark counts it."""
    return any(
        c.get("text") is not None or (c.get("delta") or {}).get("content") is not None
        for c in chunk.get("choices") or []
    )


async def send_request(session: aiohttp.ClientSession, target: LoadTarget, prompt: Prompt) -> RequestResult:
    url, body = request_payload(target, prompt)
    result = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = str(chunk["error"])[:200]
                    return result
                if _is_token_chunk(chunk):
                    if not result.chunk_times:
                        result.ttft = now - result.start
                    result.chunk_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
        result.end = time.perf_counter()
        result.ok = bool(result.chunk_times)
        if not result.ok:
            result.error = "no tokens in the stream"
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    if not result.end:
        result.end = time.perf_counter()
    return result


class OverheadMonitor:
    """Measures the client while it runs: event-loop lag (a 10 ms ticker's lateness) and CPU time."""

    def __init__(self, tick_s: float = 0.01):
        self.tick_s = tick_s
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self.lags.append(max(0.0, time.perf_counter() - t0 - self.tick_s))

    def __enter__(self) -> OverheadMonitor:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()
        self.cpu_s = time.process_time() - self.cpu0
        self.wall_s = time.perf_counter() - self.wall0

    def summary(self) -> dict[str, float]:
        lags = sorted(self.lags) or [0.0]
        return {
            "client_cpu_s": self.cpu_s,
            "client_cpu_fraction": self.cpu_s / max(self.wall_s, 1e-9),
            "loop_lag_ms_p50": 1000 * lags[len(lags) // 2],
            "loop_lag_ms_p99": 1000 * lags[int(0.99 * (len(lags) - 1))],
            "loop_lag_ms_max": 1000 * lags[-1],
        }


def _session(target: LoadTarget) -> aiohttp.ClientSession:
    # limit=0: no connection cap of aiohttp's own; concurrency is the test's parameter, not the pool's.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=target.timeout_s),
    )


async def closed_loop(
    target: LoadTarget, prompts: list[Prompt], parallel: int
) -> tuple[list[RequestResult], float, dict]:
    """`parallel` workers, each sending its next prompt as soon as its last reply ends."""
    queue = list(reversed(prompts))
    results: list[RequestResult] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            results.append(await send_request(session, target, queue.pop()))

    async with _session(target) as session:
        with OverheadMonitor() as monitor:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(session) for _ in range(parallel)))
            duration = time.perf_counter() - t0
    return results, duration, monitor.summary()


async def open_loop(
    target: LoadTarget, prompts: list[Prompt], rate: float, seed: int = 0, max_concurrency: int | None = None
) -> tuple[list[RequestResult], float, dict]:
    """Poisson arrivals at `rate` requests/s, independent of how fast replies come back."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(session: aiohttp.ClientSession, prompt: Prompt) -> RequestResult:
        if limit is None:
            return await send_request(session, target, prompt)
        async with limit:
            return await send_request(session, target, prompt)

    async with _session(target) as session:
        with OverheadMonitor() as monitor:
            t0 = time.perf_counter()
            tasks, next_at = [], t0
            for prompt in prompts:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(session, prompt)))
                next_at += rng.expovariate(rate)
            results = list(await asyncio.gather(*tasks))
            duration = time.perf_counter() - t0
    return results, duration, monitor.summary()
