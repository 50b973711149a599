"""How the trainer reads the weight routes' answers: the JSON body, or PushFailed with the server's message.

Shared by both push clients (client.py for shm/http, gpu_client.py for nccl/ipc); neither imports
the other for it. The error envelope read here is the OpenAI-style one the server sends.
"""

from __future__ import annotations

import httpx


class PushFailed(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"weight push failed ({status}): {message}")
        self.status = status
        self.message = message


def push_answer(resp: httpx.Response) -> dict:
    """The JSON body of a weight route's answer; PushFailed(status, the server's message) on a 4xx/5xx."""
    try:
        body = resp.json()
    except ValueError:
        body = {"error": {"message": resp.text[:500]}}
    if resp.status_code >= 400:
        err = body.get("error", body)
        raise PushFailed(resp.status_code, err.get("message", str(err)) if isinstance(err, dict) else str(err))
    return body
