"""HTTP reward server client: a remote scorer or LLM judge behind a small JSON protocol.

Request:  POST <url>  {"completion": str, "answer": any, "context": {...}}   (JSON)
Response: 200 {"value": float, "details": {...}}   ("reward" is accepted for "value")

Context values that are not JSON (token id arrays are fine) are sent as strings. Transient
failures (connection errors, 5xx, 429) are retried with exponential backoff; after `retries`
the scorer raises, or returns `fallback` when one is set, with the error in the details.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from flywheel.sampler.record import Reward
from flywheel.sampler.rewards.registry import Scorer, ScorerError, register_scorer


class RemoteRewardError(RuntimeError):
    """The reward server did not give a usable answer."""


@register_scorer("http")
def http_scorer(
    url: str,
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 0.5,
    headers: dict[str, str] | None = None,
    fallback: float | None = None,
    name: str = "http",
) -> Scorer:
    """Score by POSTing to a reward server (see module docstring for the protocol)."""
    if not url.startswith(("http://", "https://")):
        raise ScorerError(f"http scorer: url must start with http:// or https://, got {url!r}")
    client = httpx.Client(timeout=timeout_s, headers=headers or {})

    def post(payload: bytes) -> dict[str, Any]:
        last = ""
        for attempt in range(retries + 1):
            try:
                response = client.post(url, content=payload, headers={"content-type": "application/json"})
                if response.status_code < 500 and response.status_code != 429:
                    if response.status_code != 200:
                        raise RemoteRewardError(
                            f"reward server {url} answered {response.status_code}: {response.text[:200]}"
                        )
                    body = response.json()
                    value = body.get("value", body.get("reward"))
                    if not isinstance(value, int | float):
                        raise RemoteRewardError(f"reward server {url} sent no numeric 'value': {str(body)[:200]}")
                    return body
                last = f"HTTP {response.status_code}"
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
        raise RemoteRewardError(f"reward server {url} failed after {retries + 1} attempts: {last}")

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        payload = json.dumps({"completion": completion, "answer": answer, "context": context}, default=str).encode()
        try:
            body = post(payload)
        except RemoteRewardError as exc:
            if fallback is None:
                raise
            return Reward(name=name, value=fallback, details={"error": str(exc)})
        return Reward(name=name, value=float(body.get("value", body.get("reward"))), details=body.get("details", {}))

    return score
