"""Flywheel's ASGI middleware around vLLM's app: auth and policy-version stamping.

Pure ASGI (no BaseHTTPMiddleware) so that streaming responses pass through untouched except
for the bytes we add, and the per-request overhead stays a few microseconds.

Auth:
  - admin requests (anything that changes server state: every non-GET route outside the OpenAI
    API, including vLLM's dev routes when enabled, and everything under /flywheel/admin) need
    `Authorization: Bearer <admin token>`;
  - with an API key configured, the OpenAI routes need `Bearer <api key>` (the admin token works too).
  Failures are OpenAI-style JSON error bodies.

Versions (see shared/DESIGN.md; header names from server/status.py): every response carries
  x-flywheel-policy-version:  the version serving when the response started
  x-flywheel-policy-versions: every version served between the request's arrival and then
                              (more than one when a push happened mid-request with pause mode keep)
Non-streaming completion bodies get a top-level "policy_versions" list; each streamed event
gets "policy_version" (the version serving when that chunk left the server), event by event.

Request bodies on the OpenAI routes are read whole first, at most `max_request_bytes` (413 above), and
parsed once (JSON nested too deeply is a 400); generation requests are checked and salted per policy
version (server/request_body.py).
"""

from __future__ import annotations

import hashlib
import json
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel.server.errors import openai_error_body
from flywheel.server.policy import PolicyState
from flywheel.server.request_body import SALTED_PATHS, BadRequest, EventStamper, rewrite_request
from flywheel.server.status import VERSION_HEADER, VERSIONS_HEADER

OPENAI_PREFIXES = (
    "/v1/",
    "/v2/",
    "/inference/",
    "/tokenize",
    "/detokenize",
    "/invocations",
    "/pooling",
    "/classify",
    "/score",
    "/rerank",
)
STAMPED_PATHS = SALTED_PATHS  # the generation routes: their JSON answers get "policy_versions" too
VERSION_HEADER_BYTES = VERSION_HEADER.encode()  # ASGI headers are bytes
VERSIONS_HEADER_BYTES = VERSIONS_HEADER.encode()


def openai_error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(openai_error_body(status, message, type_, code=code, param=param)).encode()


async def send_json_error(send: Send, status: int, message: str, type_: str, param: str | None = None) -> None:
    body = openai_error(status, message, type_, param=param)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def is_admin_request(method: str, path: str) -> bool:
    if path.startswith("/flywheel/admin"):
        return True
    if method in ("GET", "HEAD", "OPTIONS"):
        return False
    return not path.startswith(OPENAI_PREFIXES)


class _Tokens:
    """Constant-time comparison of bearer tokens."""

    def __init__(self, *tokens: str | None):
        self._hashes = [hashlib.sha256(t.encode()).digest() for t in tokens if t]

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def match(self, headers: Headers) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value:
            return False
        digest = hashlib.sha256(value.strip().encode()).digest()
        return any(secrets.compare_digest(digest, h) for h in self._hashes)


class FlywheelMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        policy: PolicyState,
        admin_token: str,
        api_key: str | None = None,
        max_request_bytes: int = 4 * 2**20,
    ):
        self.app = app
        self.policy = policy
        self.max_request_bytes = max_request_bytes
        self.admin = _Tokens(admin_token)
        self.users = _Tokens(api_key, admin_token) if api_key else _Tokens()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        headers = Headers(scope=scope)
        if is_admin_request(scope["method"], path):
            if not self.admin.match(headers):
                await send_json_error(
                    send,
                    401,
                    "admin route: missing or wrong `Authorization: Bearer <admin token>`",
                    "authentication_error",
                )
                return
        elif self.users and path.startswith(OPENAI_PREFIXES) and not self.users.match(headers):
            await send_json_error(
                send, 401, "missing or wrong API key (`Authorization: Bearer <api key>`)", "authentication_error"
            )
            return
        if self.policy.broken and path.startswith(OPENAI_PREFIXES):
            await send_json_error(
                send, 503, f"not serving: {self.policy.broken}; push a complete set of weights", "service_unavailable"
            )
            return
        if scope["method"] == "POST" and path.startswith(OPENAI_PREFIXES):
            replay = await self._read_body(scope, receive, send, path)
            if replay is None:
                return  # refused, answered
            scope, receive = replay
        await self.app(scope, receive, self._stamping(send, path))

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, path: str):
        """The whole request body, bounded, checked and (generation routes) salted; then replayed to
        vLLM. Returns (scope, receive) for the app, or None once an error has been answered."""
        limit = self.max_request_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_json_error(
                send,
                413,
                f"request body of {declared} bytes exceeds max_request_bytes={limit}",
                "invalid_request_error",
            )
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_json_error(
                    send, 413, f"request body exceeds max_request_bytes={limit}", "invalid_request_error"
                )
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            body = rewrite_request(b"".join(chunks), path, self.policy.version)
        except BadRequest as exc:
            await send_json_error(send, 400, exc.message, "invalid_request_error", exc.param)
            return None
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, as vLLM expects

        return {**scope, "headers": headers}, replay

    def _stamping(self, send: Send, path: str) -> Send:
        policy = self.policy
        start = policy.version
        stamp_body = path in STAMPED_PATHS
        state = {"mode": None, "buffer": [], "start": None}
        events = EventStamper()

        async def stamped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                versions = policy.versions_since(start)
                headers = [(k, v) for k, v in message.get("headers", [])]
                headers.append((VERSION_HEADER_BYTES, str(policy.version).encode()))
                headers.append((VERSIONS_HEADER_BYTES, ",".join(map(str, versions)).encode()))
                ctype = dict(headers).get(b"content-type", b"")
                if stamp_body and message.get("status") == 200:
                    if ctype.startswith(b"application/json"):
                        state["mode"] = "json"
                    elif ctype.startswith(b"text/event-stream"):
                        state["mode"] = "sse"
                message = {**message, "headers": headers}
                if state["mode"] == "json":  # content-length changes: hold the start until the body is complete
                    state["start"] = message
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and state["mode"] == "json":
                state["buffer"].append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(state["buffer"])
                try:
                    obj = json.loads(body)
                    obj["policy_versions"] = policy.versions_since(start)
                    body = json.dumps(obj, separators=(",", ":")).encode()
                except (ValueError, TypeError):
                    pass  # not an object: pass through as it was
                start_msg = state["start"]
                start_msg["headers"] = [(k, v) for k, v in start_msg["headers"] if k != b"content-length"]
                start_msg["headers"].append((b"content-length", str(len(body)).encode()))
                await send(start_msg)
                await send({"type": "http.response.body", "body": body})
                return
            if message["type"] == "http.response.body" and state["mode"] == "sse":
                more = message.get("more_body", False)
                message = {**message, "body": events.feed(message.get("body", b""), policy.version, final=not more)}
                if more and not message["body"]:
                    return  # half an event so far: it goes out with the rest
            await send(message)

        return stamped_send
