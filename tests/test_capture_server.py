"""Capture mounted in a real `flywheel serve` (its own server with capture on): slow, run on its own:

    python -m pytest -m slow tests/test_capture_server.py

(It starts a second server, so it cannot share a pytest session that already holds the `server` fixture.)
"""

from __future__ import annotations

import time

import pytest
from openai import OpenAI

from flywheel.sampler.queue import PromptQueue

pytestmark = pytest.mark.slow


def test_real_server_captures_into_prompts_stream(tiny_model, tmp_path_factory, redis_client, redis_url):
    from flywheel.clients.servers import start_server

    # a short folder: vLLM's IPC socket paths live under it and must stay under the 107-byte unix limit
    with start_server(tiny_model, tmp_path_factory.mktemp("cap"), capture_redis_url=redis_url, capture_rate=1.0) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="none")
        reply = client.chat.completions.create(
            model=srv.model, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=5, temperature=0.0
        )
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=srv.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
            )
            if c.choices
        )
        deadline = time.monotonic() + 10
        while redis_client.xlen("prompts") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    got = [d.record for d in PromptQueue(url=redis_url).get(count=10, block_s=0.5)]
    by_stream = {c.stream: c for c in got}
    assert set(by_stream) == {False, True}
    plain, stream = by_stream[False], by_stream[True]
    assert plain.messages == [{"role": "user", "content": "What is 2 + 2?"}] and plain.status == 200
    assert plain.responses == [reply.choices[0].message.content] and plain.sampling["max_tokens"] == 5
    assert plain.policy_version == 0 and plain.policy_versions == [0]
    assert stream.responses == [streamed]
