"""What eval and perf ask an OpenAI-compatible endpoint before they start: is it there, what does it serve."""

from __future__ import annotations

import httpx

from flywheel.server.errors import UserError


def served_model(base_url: str, model: str | None, api_key: str = "EMPTY") -> str:
    """GET {base_url}/models: the model to request (`model` if given, else the first one served).

    An endpoint that does not answer, or not like an OpenAI API, is a one-line user error."""
    url = base_url.rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=15)
        r.raise_for_status()
        served = [m["id"] for m in r.json().get("data", [])]
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{url} did not answer like an OpenAI API (GET /models)") from None
    if model:
        return model
    if not served:
        raise UserError(f"{url} lists no models; pass --model")
    return served[0]


def wait_healthy(url: str, process, timeout_s: float) -> str | None:
    """Poll GET {url}/health until 200 while `process` (a Popen) lives.

    Returns None when healthy, else why not ("exited with N" or "not healthy after Ns")."""
    import time

    deadline = time.time() + timeout_s
    while True:
        if process.poll() is not None:
            return f"exited with {process.poll()}"
        try:
            if httpx.get(url.rstrip("/") + "/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            return f"not healthy after {timeout_s:.0f}s"
        time.sleep(1)
