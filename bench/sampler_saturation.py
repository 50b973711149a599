"""Does the sampler keep the server busy? Sampler tokens/s vs a plain concurrent client, same server, same run.

One `flywheel serve` (clients.servers.start_server: it holds the one-server lock) and one redis-server.
Alternating `reps` times:
  plain:   `concurrency` asyncio workers, each looping chat requests with n samples, logprobs and
           return_token_ids, nothing else (no scoring, no records, no Redis): the baseline;
  sampler: `flywheel sample grpo` in-process on the same prompts and sampling settings, scoring
           with reasoning_gym, building records, pushing every group to Redis.
Both generate `prompts` x n completions with the same max_tokens and seed; the metric is
completion tokens per second of wall time. Medians over reps.

  sampler_vs_plain_tokens_per_s_ratio   goal >= 0.9

  python bench/sampler_saturation.py                         # tiny-qwen3, 32 prompts x n=8, 64 tokens
  python bench/sampler_saturation.py --prompts 16 --reps 2
Writes bench/results/sampler_saturation.json (flat keys).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FLYWHEEL_HOME", str(REPO / ".flywheel"))


async def plain_client(base_url: str, model: str, items: list, args) -> dict:
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=base_url,
        api_key="none",
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency)),
        timeout=600,
    )
    todo = list(items)
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while todo:
            item = todo.pop()
            r = await client.chat.completions.create(
                model=model,
                messages=item.messages,
                n=args.n,
                temperature=1.0,
                max_tokens=args.max_tokens,
                seed=args.seed,
                logprobs=True,
                extra_body={"return_token_ids": True},
            )
            tokens += sum(len(c.model_extra.get("token_ids") or []) for c in r.choices)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    seconds = time.monotonic() - start
    await client.close()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def sampler_run(base_url: str, model: str, redis_url: str, args) -> dict:
    from flywheel.sampler.config import (
        EndpointConfig,
        GrpoSampleConfig,
        PromptSourceConfig,
        QueueConfig,
        SamplingConfig,
    )
    from flywheel.sampler.grpo import sample_grpo

    config = GrpoSampleConfig(
        endpoint=EndpointConfig(base_url=base_url, model=model),
        prompts=PromptSourceConfig(num_prompts=args.prompts),
        sampling=SamplingConfig(n=args.n, max_tokens=args.max_tokens, seed=args.seed),
        queue=QueueConfig(url=redis_url, stream=f"bench-{time.time_ns()}", max_backlog=100_000),
        concurrency=args.concurrency,
        drop_uniform_groups=False,
        progress=False,
    )
    summary = asyncio.run(sample_grpo(config))
    return {
        "tokens": summary["completion_tokens"],
        "seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from flywheel.clients.servers import start_redis, start_server
    from flywheel.sampler.config import PromptSourceConfig
    from flywheel.sampler.prompts import gym_prompts
    from flywheel.server.models import resolve_model

    items = list(gym_prompts(PromptSourceConfig(num_prompts=args.prompts)))
    work = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
    redis_proc, redis_url = start_redis(work)
    plain, ours = [], []
    try:
        with start_server(resolve_model(args.model), work / "serve") as srv:
            asyncio.run(plain_client(srv.base_url, srv.model, items[:4], args))  # warm-up, not measured
            for rep in range(args.reps):
                plain.append(asyncio.run(plain_client(srv.base_url, srv.model, items, args)))
                ours.append(sampler_run(srv.base_url, srv.model, redis_url, args))
                print(
                    f"rep {rep}: plain {plain[-1]['tokens_per_s']:.0f} tok/s, sampler {ours[-1]['tokens_per_s']:.0f} "
                    "tok/s",
                    flush=True,
                )
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    plain_tps = statistics.median(r["tokens_per_s"] for r in plain)
    ours_tps = statistics.median(r["tokens_per_s"] for r in ours)
    import openai
    import vllm

    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "versions": f"python {platform.python_version()}, vllm {vllm.__version__}, openai {openai.__version__}",
        "model": args.model,
        "prompts": args.prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "reps": args.reps,
        "plain_tokens_per_s": round(plain_tps, 1),
        "sampler_tokens_per_s": round(ours_tps, 1),
        "plain_tokens_per_rep": statistics.median(r["tokens"] for r in plain),
        "sampler_tokens_per_rep": statistics.median(r["tokens"] for r in ours),
        "sampler_vs_plain_tokens_per_s_ratio": round(ours_tps / plain_tps, 3),
        "goal_sampler_vs_plain_tokens_per_s_ratio": 0.9,
    }
    out = REPO / "bench" / "results" / "sampler_saturation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
