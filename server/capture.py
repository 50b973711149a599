"""Opt-in capture of production requests into a Redis stream (`prompts`), for live GRPO.

The format (owned here; sampler/ reads it with `CapturedRequest.from_bytes`):
    One stream entry per captured request, field `r` = msgpack map of CapturedRequest's fields:
    schema_version, id, captured_at, endpoint ('chat' | 'completions'), model, messages (chat) or
    prompt (completions), sampling (every other request parameter: temperature, top_p,
    max_tokens, n, seed, stop, ...), stream, status, responses (text of each choice),
    finish_reasons, policy_version (serving when the request arrived) and policy_versions (every
    version served while it ran), redacted; for feedback (server/feedback.py) also completion_id
    (the response's `id`, as the OpenAI SDK returns it), prompt_token_ids, and per choice
    completion_token_ids and completion_logprobs (the server's processed logprobs), when the
    response carried them. An unknown schema_version is refused on decode.

The link: with `link_ttl_s` > 0 a 200 response with an id is also stored under
`link_key(stream, completion_id)` (the same bytes, expiring after link_ttl_s), so feedback on a
completion finds its capture; a request that was not captured (rate, redact) has no link.

The middleware (`CaptureMiddleware`, pure ASGI, mounted by server/serve.py when
`capture_redis_url` is set) never slows or breaks a response:
- a user opts a request out with the header `x-flywheel-capture: off` (OPT_OUT_HEADER; the OpenAI
  SDK: `extra_headers={"x-flywheel-capture": "off"}`): nothing of it is copied or written, not even
  the feedback link (counted as `opted_out`);
- the sampling decision (`rate`) is taken first; an uncaptured request passes straight through;
- request and response bytes are only copied (bounded by `max_bytes`; beyond that the capture is
  abandoned), the messages go to the client unchanged and unwaited;
- the Redis write runs as a background task after the response has been sent, with a short
  timeout and a bound on writes in flight; any failure is logged (rate-limited) and counted in
  `counters`, never raised into the request.
- `redact`: dotted path of a function(CapturedRequest) -> CapturedRequest | None, applied before
  the write (None drops the capture).
The stream is trimmed approximately to `max_len` entries: captures are a sample of traffic, and
the oldest unconsumed ones are the least useful.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel.server.framing import from_msgpack, to_msgpack, validate_versioned

log = logging.getLogger("flywheel.capture")
SCHEMA_VERSION = 1
FIELD = b"r"
PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# cache_salt: a tenant's cache-isolation secret (and Flywheel's per-version salt), never captured
_NOT_SAMPLING = ("messages", "prompt", "model", "stream", "cache_salt")
OPT_OUT_HEADER = "x-flywheel-capture"
_OPT_OUT_VALUES = (b"off", b"0", b"false", b"no")


def opted_out(scope: Scope) -> bool:
    """Whether the request says `x-flywheel-capture: off` (never captured, whatever the rate)."""
    name = OPT_OUT_HEADER.encode()
    return any(k.lower() == name and v.strip().lower() in _OPT_OUT_VALUES for k, v in scope.get("headers", []))


class CaptureFormatError(ValueError):
    """Bytes that are not a captured request of this schema."""


class CapturedRequest(BaseModel):
    """One production request and its response, as stored in the prompts stream."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of this format")
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Unique id of the capture")
    captured_at: float = Field(default_factory=time.time, description="Unix time the response finished")
    endpoint: Literal["chat", "completions"] = Field(description="Which OpenAI route served it")
    model: str | None = Field(default=None, description="Model name the client asked for")
    messages: list[dict[str, Any]] | None = Field(default=None, description="Chat messages (chat endpoint)")
    prompt: Any = Field(default=None, description="Prompt (completions endpoint): text, token ids, or a list of them")
    sampling: dict[str, Any] = Field(
        default_factory=dict, description="All other request parameters (temperature, max_tokens, ...)"
    )
    stream: bool = Field(default=False, description="Whether the client asked for a streamed response")
    status: int = Field(default=200, description="HTTP status of the response")
    responses: list[str] = Field(default_factory=list, description="Text of each choice, by index")
    finish_reasons: list[str | None] = Field(default_factory=list, description="Finish reason of each choice")
    policy_version: int | None = Field(default=None, description="Policy version serving when the request arrived")
    policy_versions: list[int] = Field(default_factory=list, description="Every policy version served while it ran")
    redacted: bool = Field(default=False, description="Set by a redaction hook that changed the capture")
    completion_id: str | None = Field(default=None, description="The response's id, as the OpenAI SDK returned it")
    prompt_token_ids: list[int] | None = Field(
        default=None, description="Prompt token ids, when the response carried them (return_token_ids)"
    )
    completion_token_ids: list[list[int] | None] = Field(
        default_factory=list, description="Token ids of each choice, by index (None where the response had none)"
    )
    completion_logprobs: list[list[float] | None] = Field(
        default_factory=list,
        description="The server's processed logprob of each choice's tokens, by index (None where not returned)",
    )

    def to_bytes(self) -> bytes:
        return to_msgpack(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> CapturedRequest:
        obj = from_msgpack(data, CaptureFormatError)
        return validate_versioned(cls, obj, what="capture", schema_version=SCHEMA_VERSION, error=CaptureFormatError)


def link_key(stream: str, completion_id: str) -> str:
    """Redis key of the capture of one completion (see the module docstring)."""
    return f"{stream}:completion:{completion_id}"


def load_redact(path: str | None) -> Callable[[CapturedRequest], CapturedRequest | None] | None:
    """'package.module:function' (or 'package.module.function') -> the function; fails at startup, not per request."""
    if not path:
        return None
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"capture redact hook {path!r} is not callable")
    return fn


class _ResponseCopy:
    """Collects the text of each choice from a JSON body or an SSE stream, within a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self.status, self.sse = 200, False
        self.body: list[bytes] = []
        self.pending = b""
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.completion_id: str | None = None
        self.prompt_token_ids: list[int] | None = None
        self.overflow = False

    def start(self, message: Message) -> None:
        self.status = message.get("status", 200)
        headers = dict(message.get("headers", []))
        self.sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.overflow = True
            return
        if not self.sse:
            self.body.append(chunk)
            return
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                try:
                    self._choices(json.loads(line[6:]))
                except ValueError:
                    pass

    def _choices(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("id"), str):
            self.completion_id = obj["id"]
        if isinstance(obj.get("prompt_token_ids"), list):
            self.prompt_token_ids = obj["prompt_token_ids"]
        for choice in obj.get("choices") or []:
            i = choice.get("index", 0)
            if isinstance(choice.get("token_ids"), list):
                self.token_ids.setdefault(i, []).extend(choice["token_ids"])
            if self.prompt_token_ids is None and isinstance(choice.get("prompt_token_ids"), list):
                self.prompt_token_ids = choice["prompt_token_ids"]  # completions: per choice
            logprobs = _token_logprobs(choice.get("logprobs"))
            if logprobs is not None:
                self.logprobs.setdefault(i, []).extend(logprobs)
            delta = choice.get("delta")
            text = (delta or {}).get("content") if delta is not None else choice.get("text")
            if text is None and "message" in choice:
                text = (choice["message"] or {}).get("content")
            if text:
                self.texts.setdefault(i, []).append(text)
            else:
                self.texts.setdefault(i, [])
            if choice.get("finish_reason") is not None or i not in self.finish:
                self.finish[i] = choice.get("finish_reason")

    def result(self) -> dict[str, Any]:
        """The CapturedRequest fields read from the response."""
        if not self.sse and self.body:
            try:
                self._choices(json.loads(b"".join(self.body)))
            except ValueError:
                pass
        order = sorted(self.texts)
        return {
            "responses": ["".join(self.texts[i]) for i in order],
            "finish_reasons": [self.finish.get(i) for i in order],
            "completion_id": self.completion_id,
            "prompt_token_ids": self.prompt_token_ids,
            "completion_token_ids": [self.token_ids.get(i) for i in order],
            "completion_logprobs": [self.logprobs.get(i) for i in order],
        }


def _token_logprobs(logprobs: Any) -> list[float] | None:
    """Per-token logprobs of a choice: chat's logprobs.content[].logprob, completions' logprobs.token_logprobs."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        return [float(t["logprob"]) for t in logprobs["content"]]
    if isinstance(logprobs.get("token_logprobs"), list):
        return [float(v) if v is not None else 0.0 for v in logprobs["token_logprobs"]]
    return None


class CaptureMiddleware:
    """Copies a sample of chat/completions requests and responses into a Redis stream (see module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        redis_url: str,
        stream: str = "prompts",
        rate: float = 1.0,
        redact: str | Callable | None = None,
        policy: Any = None,
        max_bytes: int = 4 << 20,
        max_len: int = 100_000,
        max_in_flight: int = 256,
        timeout_s: float = 2.0,
        link_ttl_s: int = 0,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"capture rate must be within [0, 1], got {rate}")
        import redis.asyncio

        self.app = app
        self.redis = redis.asyncio.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.stream, self.rate, self.policy = stream, rate, policy
        self.redact = redact if callable(redact) else load_redact(redact)
        self.max_bytes, self.max_len, self.max_in_flight = max_bytes, max_len, max_in_flight
        self.link_ttl_s = link_ttl_s
        self.counters = {
            "captured": 0,
            "skipped": 0,
            "opted_out": 0,
            "dropped_by_redact": 0,
            "too_large": 0,
            "errors": 0,
            "overloaded": 0,
        }
        self._tasks: set[asyncio.Task] = set()
        self._last_error_log = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        endpoint = PATHS.get(scope["path"].removeprefix(scope.get("root_path", "")))
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        if opted_out(scope):
            self.counters["opted_out"] += 1
            await self.app(scope, receive, send)
            return
        if self.rate < 1.0 and random.random() >= self.rate:
            self.counters["skipped"] += 1
            await self.app(scope, receive, send)
            return
        version = getattr(self.policy, "version", None)
        request_body: list[bytes] = []
        request_size = [0]
        response = _ResponseCopy(self.max_bytes)

        async def copying_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                request_size[0] += len(message.get("body", b""))
                if request_size[0] <= self.max_bytes:
                    request_body.append(message.get("body", b""))
            return message

        async def copying_send(message: Message) -> None:
            await send(message)  # the client first; copying after never delays the bytes
            try:
                if message["type"] == "http.response.start":
                    response.start(message)
                elif message["type"] == "http.response.body":
                    response.feed(message.get("body", b""))
                    if not message.get("more_body"):
                        self._schedule(endpoint, request_body, request_size[0], response, version)
            except Exception as exc:  # a capture bug must never reach the response
                self._failed(exc)

        await self.app(scope, copying_receive, copying_send)

    # ------------------------------------------------------------ background write
    def _schedule(
        self, endpoint: str, body: list[bytes], size: int, response: _ResponseCopy, version: int | None
    ) -> None:
        if size > self.max_bytes or response.overflow:
            self.counters["too_large"] += 1
            return
        if len(self._tasks) >= self.max_in_flight:
            self.counters["overloaded"] += 1  # Redis is slower than traffic: shed captures, not requests
            return
        task = asyncio.get_running_loop().create_task(self._write(endpoint, b"".join(body), response, version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _build(self, endpoint: str, body: bytes, response: _ResponseCopy, version: int | None) -> CapturedRequest:
        request = json.loads(body) if body else {}
        if not isinstance(request, dict):
            raise ValueError("request body is not a JSON object")
        versions = self.policy.versions_since(version) if version is not None and self.policy is not None else []
        return CapturedRequest(
            endpoint=endpoint,
            model=request.get("model"),
            messages=request.get("messages") if endpoint == "chat" else None,
            prompt=request.get("prompt") if endpoint == "completions" else None,
            sampling={k: v for k, v in request.items() if k not in _NOT_SAMPLING},
            stream=bool(request.get("stream")),
            status=response.status,
            policy_version=version,
            policy_versions=versions,
            **response.result(),
        )

    async def _write(self, endpoint: str, body: bytes, response: _ResponseCopy, version: int | None) -> None:
        try:
            record = self._build(endpoint, body, response, version)
            if self.redact is not None:
                before = record.model_copy(deep=True)
                record = self.redact(record)
                if record is None:
                    self.counters["dropped_by_redact"] += 1
                    return
                if record != before:
                    record.redacted = True
            data = record.to_bytes()
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.stream, {FIELD: data}, maxlen=self.max_len, approximate=True)
                if self.link_ttl_s > 0 and record.completion_id and record.status == 200:
                    pipe.set(link_key(self.stream, record.completion_id), data, ex=self.link_ttl_s)
                await pipe.execute()
            self.counters["captured"] += 1
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.counters["errors"] += 1
        now = time.monotonic()
        if now - self._last_error_log > 10.0:  # a Redis outage must not flood the log
            self._last_error_log = now
            log.warning(
                "capture failed (%d errors so far; responses unaffected): %s: %s",
                self.counters["errors"],
                type(exc).__name__,
                exc,
            )

    async def drain(self) -> None:
        """Wait for captures in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
