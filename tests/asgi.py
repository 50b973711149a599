"""Small pieces for tests that play an ASGI app (vLLM's routes) behind our middleware."""

from __future__ import annotations


async def read_body(receive) -> bytes:
    """The whole request body, however many messages it came in."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
