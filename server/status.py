"""The status / policy-version contract of a Flywheel server, owned here, read by every client.

    every response          x-flywheel-policy-version:  the version serving when the response started
                            x-flywheel-policy-versions: every version served since the request arrived
    completion bodies       "policy_versions": [...] (non-streaming), "policy_version" per streamed chunk
    GET /flywheel/status    ServerStatus (JSON)

The server's middleware stamps the headers under these names and its status route answers with a
ServerStatus; the sampler, the trainer's pusher, the GPU push client, eval and `flywheel up` read
them through the functions below. Light on purpose (httpx and pydantic only): clients import it.
Reading tolerates fields it does not know (extra="allow"), so an older client reads a newer server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

VERSION_HEADER = "x-flywheel-policy-version"
VERSIONS_HEADER = "x-flywheel-policy-versions"
STATUS_PATH = "/flywheel/status"


class CaptureStatus(BaseModel):
    """The server's traffic-capture settings."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = Field(default=False, description="Whether production requests are captured into Redis")
    stream: str | None = Field(default=None, description="Redis stream the captures go to")
    rate: float | None = Field(default=None, description="Fraction of requests captured")
    redact: str | None = Field(default=None, description="Dotted path of the redaction hook, if any")
    feedback: bool = Field(default=False, description="Whether POST /v1/feedback rates captured completions")
    feedback_scores: list[float] | None = Field(default=None, description="Declared range of numeric ratings")


class WeightsStatus(BaseModel):
    """The server's weight-push settings."""

    model_config = ConfigDict(extra="allow")

    transports: list[str] = Field(default_factory=list, description="Weight-push transports the server accepts")
    max_push_bytes: int | None = Field(default=None, description="Largest total size of one push")
    max_bucket_bytes: int | None = Field(default=None, description="Largest single HTTP bucket")
    backend: str | None = Field(default=None, description="vLLM weight-transfer backend serving the transports")
    workers: int = Field(default=1, description="Inference workers a push reaches (the NCCL group is 1 + this)")


class ServerStatus(BaseModel):
    """The body of GET /flywheel/status."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="Checkpoint the server started from")
    served_model_name: str = Field(description="Model name clients use in requests")
    policy_version: int = Field(description="Version serving now: 0 for the starting checkpoint, +1 per push")
    started_at: float = Field(description="Unix time the server started")
    uptime_s: float = Field(description="Seconds since start")
    last_update_at: float | None = Field(default=None, description="Unix time of the last applied push")
    updates: list[dict[str, Any]] = Field(
        default_factory=list, description="The last applied pushes (version, at, ...)"
    )
    failed_pushes: int = Field(default=0, description="Pushes refused or failed since start")
    not_serving: str | None = Field(
        default=None,
        description=(
            "Why generation is refused (503) until the next push: an update failed half-applied, or the version "
            "served before a restart could not be restored. None while serving"
        ),
    )
    paused: bool = Field(default=False, description="Whether generation is paused")
    capture: CaptureStatus = Field(default_factory=CaptureStatus, description="Traffic-capture settings")
    weights: WeightsStatus = Field(default_factory=WeightsStatus, description="Weight-push settings")
    api_key_required: bool = Field(default=False, description="Whether the OpenAI routes need an API key")


def fetch_status(
    url: str, admin_token: str | None = None, timeout: float = 10.0, client: httpx.Client | None = None
) -> ServerStatus:
    """GET {url}/flywheel/status (url: the server root, a trailing /v1 is ignored).

    Raises httpx.HTTPError (unreachable, or a non-2xx answer) or ValueError (not a status body)."""
    root = url.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {admin_token}"} if admin_token else None
    resp = (client or httpx).get(root + STATUS_PATH, headers=headers, timeout=timeout)
    resp.raise_for_status()
    return ServerStatus.model_validate(resp.json())


def response_versions(headers: Mapping[str, str], body: Mapping[str, Any]) -> list[int]:
    """Every version that may have produced a completion: the versions header, else the version header,
    else the body's policy_versions; [] from a server that sends none (any non-Flywheel endpoint)."""
    many = headers.get(VERSIONS_HEADER)
    if many:
        return [int(v) for v in many.split(",") if v.strip()]
    one = headers.get(VERSION_HEADER)
    if one is not None:
        return [int(one)]
    return [int(v) for v in body.get("policy_versions") or []]


def response_version(headers: Mapping[str, str]) -> int | None:
    """The version serving when a response started (its version header); None when absent or unreadable."""
    raw = headers.get(VERSION_HEADER)
    try:
        return int(raw.split(",")[0]) if raw else None
    except ValueError:
        return None
