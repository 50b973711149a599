"""Shared fixtures: real Redis, real models, real vLLM servers.

- `redis_url`: a real redis-server. `.ci/run` starts one and exports FLYWHEEL_TEST_REDIS_URL; otherwise
  this starts its own on a free loopback port for the session. Each test gets a clean database
  through `redis_client` (FLUSHDB before the test).
- `tiny_model` / `tiny_moe_model`: HF folders of the bundled tiny models (built once, cached under
  FLYWHEEL_HOME, default <repo>/.flywheel).
- `server`: one real `flywheel serve` on tiny-qwen3 for the whole session (see clients/servers.py).
  Only one vLLM server may run at a time on this 2-core machine: `clients.servers.start_server` holds
  an exclusive file lock for the life of the server, so parallel pytest runs queue instead of
  overloading the machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flywheel.clients.servers import start_redis

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLYWHEEL_HOME", str(REPO / ".flywheel"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = os.environ.get("FLYWHEEL_TEST_REDIS_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not found: apt-get update && apt-get install -y redis-server")
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from flywheel.server.models import resolve_model

    return resolve_model("tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_moe_model() -> Path:
    from flywheel.server.models import resolve_model

    return resolve_model("tiny-qwen3-moe")


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """A real Flywheel server on tiny-qwen3, shared by the session."""
    from flywheel.clients.servers import start_server

    with start_server(tiny_model, tmp_path_factory.mktemp("serve")) as srv:
        yield srv
