"""Run benchmark items against any OpenAI-compatible endpoint, then grade the replies.

Two phases, so neither waits on the other's bottleneck:
1. query (async, one event loop, at most `concurrency` requests in flight): generate n replies per
   item through /v1/chat/completions (the server applies its chat template) or /v1/completions
   (raw text prompt), or, for log-likelihood items, score every choice through /v1/completions
   with `echo` + `logprobs` (the prompt tokens' logprobs come back with their text offsets);
2. grade (in the main thread, where math-verify's signal-based timeouts work): each reply goes to
   the item's scorer, the sampler's reward function of that name.

Nothing here needs a Flywheel-only route: the policy version is read from the
`x-flywheel-policy-version` reply header when the server sends one.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpx
from tqdm import tqdm

from flywheel.clients.eval.datasets import EvalItem
from flywheel.server.capture import OPT_OUT_HEADER
from flywheel.server.status import response_version


@dataclass
class QuerySettings:
    base_url: str
    model: str
    api_key: str = "EMPTY"
    prompt_format: str = "chat"  # "chat" or "completion"
    chat_template: str | None = None  # Jinja text sent as vLLM's `chat_template` (None: the server's)
    system_prompt: str | None = None
    num_fewshot: int = 0
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    n: int = 1  # samples per generative item (pass@k needs n >= k)
    concurrency: int = 8
    timeout_s: float = 300.0


@dataclass
class Sample:
    """One item's replies (or choice log-likelihoods) and, after grading, their scores."""

    item: EvalItem
    prompt: Any = None  # what was sent: messages list or text
    completions: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    choice_logprobs: list[float] | None = None
    policy_version: int | None = None
    error: str | None = None
    rewards: list[dict] = field(default_factory=list)  # one Reward (as dict) per completion
    score: float = 0.0  # mean reward over completions (accuracy / pass@1)

    def to_record(self) -> dict[str, Any]:
        it = self.item
        return {
            "benchmark": it.benchmark,
            "id": it.id,
            "member": it.meta.get("member"),
            "scorer": it.scorer,
            "prompt": self.prompt,
            "completions": self.completions,
            "finish_reasons": self.finish_reasons,
            "choice_logprobs": self.choice_logprobs,
            "answer": it.answer,
            "rewards": self.rewards,
            "score": self.score,
            "policy_version": self.policy_version,
            "error": self.error,
            "meta": it.meta,
        }


# ---------------------------------------------------------------- prompts


def chat_messages(item: EvalItem, s: QuerySettings) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": s.system_prompt}] if s.system_prompt else []
    for q, a in item.shots[: s.num_fewshot]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}]
    return messages + [{"role": "user", "content": item.prompt}]


def text_prompt(item: EvalItem, s: QuerySettings) -> str:
    """Raw-completion prompt: few-shot pairs, then the item (its code prompt for HumanEval)."""
    if item.completion_prompt is not None:
        return item.completion_prompt
    head = (s.system_prompt + "\n\n") if s.system_prompt else ""
    # Shot answers of log-likelihood items start with a space (' C'), generative ones get a newline.
    shots = "".join(f"{q}{a if a.startswith(' ') else chr(10) + a}\n\n" for q, a in item.shots[: s.num_fewshot])
    return head + shots + item.prompt


# ---------------------------------------------------------------- querying


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    resp = await client.post(path, json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code} from {path}: {resp.text[:300]}")
    return resp


def _sampling(s: QuerySettings) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": s.model,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "n": s.n,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    return body


async def generate(client: httpx.AsyncClient, sample: Sample, s: QuerySettings) -> None:
    item = sample.item
    body = _sampling(s)
    if s.prompt_format == "chat":
        path, sample.prompt = "/chat/completions", chat_messages(item, s)
        body["messages"] = sample.prompt
        if s.chat_template:
            body["chat_template"] = s.chat_template
    else:
        path, sample.prompt = "/completions", text_prompt(item, s)
        body["prompt"] = sample.prompt
        if item.stop:
            body["stop"] = item.stop
    resp = await _post(client, path, body)
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    sample.completions = [(c["message"].get("content") or "") if "message" in c else c["text"] for c in choices]
    sample.finish_reasons = [c.get("finish_reason") for c in choices]
    sample.policy_version = response_version(resp.headers)


def continuation_logprob(logprobs: dict[str, Any], start: int, end: int) -> float:
    """Sum of the logprobs of the echoed tokens that overlap characters [start, end) of the prompt.

    A token straddling the context/continuation boundary counts for the continuation (BPE may merge
    ' A' with what precedes it); the token generated after the prompt starts at `end` and is left out."""
    offsets, values, tokens = logprobs["text_offset"], logprobs["token_logprobs"], logprobs["tokens"]
    total = 0.0
    for i, (off, lp) in enumerate(zip(offsets, values)):
        tok_end = offsets[i + 1] if i + 1 < len(offsets) else off + len(tokens[i])
        if off < end and tok_end > start:
            if lp is None:  # the very first prompt token has no logprob
                continue
            total += lp
    return total


async def loglikelihood(client: httpx.AsyncClient, sample: Sample, s: QuerySettings) -> None:
    context = text_prompt(sample.item, s)
    choices = sample.item.choices or []
    sample.prompt = context
    body = {
        "model": s.model,
        "prompt": [context + c for c in choices],
        "max_tokens": 1,
        "temperature": 0.0,
        "echo": True,
        "logprobs": 1,
    }
    resp = await _post(client, "/completions", body)
    by_index = {c["index"]: c for c in resp.json()["choices"]}
    sample.choice_logprobs = [
        continuation_logprob(by_index[i]["logprobs"], len(context), len(context) + len(c))
        for i, c in enumerate(choices)
    ]
    sample.policy_version = response_version(resp.headers)


async def query_all(items: list[EvalItem], s: QuerySettings, desc: str = "eval") -> list[Sample]:
    samples = [Sample(item=it) for it in items]
    limit = asyncio.Semaphore(s.concurrency)
    # held-out prompts must never become training prompts through a capturing server
    headers = {"Authorization": f"Bearer {s.api_key}", OPT_OUT_HEADER: "off"}
    async with httpx.AsyncClient(
        base_url=s.base_url.rstrip("/"),
        headers=headers,
        timeout=s.timeout_s,
        limits=httpx.Limits(max_connections=s.concurrency),
    ) as client:
        bar = tqdm(total=len(samples), desc=desc, unit="item", leave=False)

        async def one(sample: Sample) -> None:
            async with limit:
                try:
                    if sample.item.kind == "loglikelihood":
                        await loglikelihood(client, sample, s)
                    else:
                        await generate(client, sample, s)
                except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
                    sample.error = f"{type(exc).__name__}: {exc}"[:500]
                bar.update()

        await asyncio.gather(*(one(x) for x in samples))
        bar.close()
    return samples


# ---------------------------------------------------------------- grading


@lru_cache(maxsize=64)
def _scorer(name: str, options: tuple) -> Any:
    if name == "ifbench":  # benchmark-specific verifier, not a reward
        from flywheel.clients.eval.ifbench_verifier import ifbench_score

        return ifbench_score
    from flywheel.sampler.rewards import get_scorer

    return get_scorer(name, **dict(options))


def scorer_for(item: EvalItem) -> Any:
    return _scorer(item.scorer, tuple(sorted(item.scorer_options.items())))


def grade_reply(item: EvalItem, completion: str, prompt: Any) -> dict:
    """The item's scorer on one reply; a list answer means 'any of these' (CHAMP's equivalent forms)."""
    scorer = scorer_for(item)
    answers = item.answer if isinstance(item.answer, list) and item.scorer == "math_verify" else [item.answer]
    best = None
    for ans in answers:
        reward = scorer(completion, ans, prompt=prompt, task=item.meta.get("task"))
        if best is None or reward.value > best.value:
            best = reward
    return best.model_dump()


def grade(samples: list[Sample]) -> None:
    for sample in tqdm(samples, desc="grading", unit="item", leave=False):
        item = sample.item
        if sample.error:
            sample.score = 0.0
            continue
        if item.kind == "loglikelihood":
            pick = max(range(len(sample.choice_logprobs)), key=lambda i: sample.choice_logprobs[i])
            letter = (item.choices[pick]).strip()
            sample.completions = [letter]
            ok = letter == str(item.answer).strip()
            sample.rewards = [
                {"name": "loglikelihood_choice", "value": float(ok), "weight": 1.0, "details": {"picked": letter}}
            ]
            sample.score = float(ok)
            continue
        sample.rewards = [grade_reply(item, c, sample.prompt) for c in sample.completions]
        sample.score = sum(r["value"] for r in sample.rewards) / max(1, len(sample.rewards))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
