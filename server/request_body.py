"""What the middleware does to request bodies on the OpenAI routes and to streamed answers.

Requests (every POST on the OpenAI routes), read whole before vLLM sees them:
  - JSON nested too deeply for Python's parser is refused with a 400 (vLLM's /invocations and our
    /v1/feedback answered it with a 500, the others with FastAPI's own 400); other bodies that are
    not JSON go to vLLM untouched, which answers them;
On the generation routes (SALTED_PATHS):
  - chat messages need a role the OpenAI API knows; vLLM accepts any string (a `wizard` got 200);
  - `cache_salt` gets the serving policy version appended, so KV blocks computed under one version
    are never a prefix-cache hit for a request that arrived under another: a push's prefix-cache
    reset cannot free blocks that running requests still hold (pause mode keep), and those blocks
    used to be reused after the push (wrong answers after a bad version was replaced). A client's
    own salt (tenant isolation) is kept in front.
Streamed answers (text/event-stream): each event `data: {...}` gets "policy_version" as its first
key, event by event. Events end with a blank line, which JSON never contains unescaped, so a chunk
boundary can fall anywhere (the tail waits for the rest) and generated text that happens to read
`data: {` is left alone.
"""

from __future__ import annotations

import hashlib
import json

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_SALT = 128  # vLLM's limit on cache_salt; '@', '/', '\\' and NUL are refused there
SALT_PREFIX = "flywheel-v"
# the generation routes whose requests are checked and salted (and whose answers the middleware stamps);
# the batch route used to bypass both (unknown roles accepted, no salt)
SALTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch")


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def check_chat_roles(messages: object, where: str = "messages") -> None:
    if not isinstance(messages, list):
        return  # vLLM answers a missing or malformed `messages` with its own 400
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if isinstance(role, str) and role not in CHAT_ROLES:
            param = f"{where}[{i}].role"
            raise BadRequest(f"{param} {role[:40]!r} is not one of {sorted(CHAT_ROLES)}", param)


def check_batch_roles(conversations: object) -> None:
    """/v1/chat/completions/batch: `messages` is a list of conversations, each checked like a chat."""
    if isinstance(conversations, list):
        for i, messages in enumerate(conversations):
            check_chat_roles(messages, f"messages[{i}]")


def salted(client_salt: object, version: int) -> object:
    """The cache_salt to send vLLM for a request arriving while `version` serves."""
    if client_salt is not None and not isinstance(client_salt, str):
        return client_salt  # vLLM refuses it with its own message
    ours = f"{SALT_PREFIX}{version}"
    salt = f"{client_salt}:{ours}" if client_salt else ours
    if len(salt) > MAX_SALT:  # keep it within vLLM's limit, still distinct per (client salt, version)
        salt = f"{hashlib.sha256(client_salt.encode()).hexdigest()}:{ours}"
    return salt


def rewrite_request(raw: bytes, path: str, version: int) -> bytes:
    """The body vLLM gets for a POST to `path`; raises BadRequest for what the OpenAI API refuses.
    A body that is not a JSON object, or not for a generation route, goes through untouched."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw  # vLLM reports it
    except RecursionError:  # ~1000 nested brackets fit in a small body: not something to hand on
        raise BadRequest("the request body nests JSON arrays/objects too deeply to parse") from None
    if path not in SALTED_PATHS or not isinstance(body, dict):
        return raw
    if path == "/v1/chat/completions":
        check_chat_roles(body.get("messages"))
    elif path == "/v1/chat/completions/batch":
        check_batch_roles(body.get("messages"))
    body["cache_salt"] = salted(body.get("cache_salt"), version)
    return json.dumps(body, separators=(",", ":")).encode()


class EventStamper:
    """Adds "policy_version" to each `data: {` event of an SSE byte stream, whatever the chunking."""

    def __init__(self):
        self.tail = b""

    def feed(self, chunk: bytes, version: int, final: bool = False) -> bytes:
        data = self.tail + chunk
        if final:
            events, self.tail = data, b""
        else:
            cut = data.rfind(b"\n\n")
            if cut < 0:
                self.tail = data
                return b""
            events, self.tail = data[: cut + 2], data[cut + 2 :]
        return b"\n\n".join(stamp_event(e, version) for e in events.split(b"\n\n"))


def stamp_event(event: bytes, version: int) -> bytes:
    if not event.startswith(b"data: {"):
        return event  # [DONE], comments, empty pieces
    rest = event[len(b"data: {") :]
    tag = b'data: {"policy_version":' + str(version).encode()
    return tag + (rest if rest.lstrip().startswith(b"}") else b"," + rest)
