"""What the middleware does to requests and streamed answers (issue 16, defects 7, 9, 12, 13).

Unit tests drive FlywheelMiddleware over a small vLLM-shaped ASGI app (through the OpenAI SDK for
the stream); the last ones ask the session's real server."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from flywheel.server.middleware import FlywheelMiddleware
from flywheel.server.policy import PolicyState
from flywheel.server.request_body import EventStamper, rewrite_request
from tests.asgi import read_body

TRICKY = 'say data: {"x": 1} and data: {"y": 2}\n\nok'  # text that used to be rewritten inside the JSON
TOKEN = "admin-token"


def completion_chunks(text: str) -> list[bytes]:
    """vLLM-shaped SSE events for a streamed completion whose generated text is `text`."""
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    events = [
        b"data: "
        + json.dumps(
            {
                "id": "c",
                "object": "text_completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "text": p, "logprobs": None, "finish_reason": None}],
            }
        ).encode()
        + b"\n\n"
        for p in pieces
    ]
    return events + [b"data: [DONE]\n\n"]


def vllm_like(seen: list):
    async def app(scope, receive, send):
        body = await read_body(receive)
        seen.append(json.loads(body) if body else None)
        stream = bool(seen[-1] and seen[-1].get("stream"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream" if stream else b"application/json")],
            }
        )
        if not stream:
            await send({"type": "http.response.body", "body": json.dumps({"choices": [{"text": "hi"}]}).encode()})
            return
        raw = b"".join(completion_chunks(TRICKY))
        cuts = [0, 3, 17, 18, 60, 61, 62, 150, 151, len(raw)]  # chunk boundaries inside events and markers
        cuts = sorted({min(c, len(raw)) for c in cuts})
        for a, b in zip(cuts, cuts[1:]):
            await send({"type": "http.response.body", "body": raw[a:b], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def middleware(seen: list, version: int = 4, **kwargs) -> FlywheelMiddleware:
    policy = PolicyState(model="m", served_model_name="m")
    for v in range(1, version + 1):
        policy.publish(v)
    return FlywheelMiddleware(vllm_like(seen), policy=policy, admin_token=TOKEN, **kwargs)


def test_streamed_text_that_reads_data_brace_survives_the_sdk():
    """Stamping is per event: generated text containing `data: {` stays what the model wrote, and the
    OpenAI SDK parses every chunk (it raised on the text-substituted stream before)."""
    seen: list = []
    app = middleware(seen, version=4)

    async def run():
        client = openai.AsyncOpenAI(
            base_url="http://test/v1",
            api_key="x",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)),
        )
        chunks = [c async for c in await client.completions.create(model="m", prompt="p", max_tokens=8, stream=True)]
        return chunks

    chunks = asyncio.run(run())
    assert "".join(c.choices[0].text for c in chunks) == TRICKY
    assert {c.model_extra["policy_version"] for c in chunks} == {4}


def test_event_stamper_at_every_chunk_boundary():
    raw = b"".join(completion_chunks(TRICKY))
    for cut in range(1, len(raw)):
        stamper = EventStamper()
        out = stamper.feed(raw[:cut], 7) + stamper.feed(raw[cut:], 7, final=True)
        events = [e for e in out.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        decoded = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
        assert all(d["policy_version"] == 7 for d in decoded)
        assert "".join(d["choices"][0]["text"] for d in decoded) == TRICKY


def test_requests_are_salted_per_version_and_roles_checked():
    body = rewrite_request(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(), "/v1/chat/completions", 3
    )
    assert json.loads(body)["cache_salt"] == "flywheel-v3"
    kept = json.loads(rewrite_request(b'{"prompt": "x", "cache_salt": "tenant-a"}', "/v1/completions", 9))
    assert kept["cache_salt"] == "tenant-a:flywheel-v9"
    long = json.loads(
        rewrite_request(json.dumps({"prompt": "x", "cache_salt": "t" * 128}).encode(), "/v1/completions", 9)
    )
    assert len(long["cache_salt"]) <= 128 and long["cache_salt"].endswith(":flywheel-v9")
    assert rewrite_request(b"not json", "/v1/completions", 1) == b"not json"  # vLLM reports it


def test_middleware_refuses_unknown_roles_and_big_bodies_and_passes_the_salt():
    seen: list = []
    app = middleware(seen, version=2, max_request_bytes=1000)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            wizard = await http.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]},
            )
            big = await http.post("/v1/completions", json={"model": "m", "prompt": "x" * 2000})

            async def chunked():
                for _ in range(30):
                    yield b"x" * 100

            big_chunked = await http.post("/tokenize", content=chunked())
            ok = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
            return wizard, big, big_chunked, ok

    wizard, big, big_chunked, ok = asyncio.run(run())
    assert wizard.status_code == 400 and wizard.json()["error"]["param"] == "messages[1].role"
    assert "wizard" in wizard.json()["error"]["message"]
    assert big.status_code == 413 and big_chunked.status_code == 413
    assert "max_request_bytes" in big.json()["error"]["message"]
    assert ok.status_code == 200 and seen == [{"model": "m", "prompt": "x", "cache_salt": "flywheel-v2"}]


def test_batch_chat_is_role_checked_salted_and_stamped_like_chat():
    """/v1/chat/completions/batch (a list of conversations) bypassed the rewriting of the other chat
    routes: an unknown role went to vLLM (200) and no per-version cache_salt was added."""
    seen: list = []
    app = middleware(seen, version=5)
    ok_chat = [{"role": "user", "content": "a"}]

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            wizard = await http.post(
                "/v1/chat/completions/batch",
                json={"model": "m", "messages": [ok_chat, [{"role": "user", "content": "b"}, {"role": "wizard"}]]},
            )
            ok = await http.post(
                "/v1/chat/completions/batch", json={"model": "m", "messages": [ok_chat], "cache_salt": "t"}
            )
            return wizard, ok

    wizard, ok = asyncio.run(run())
    assert wizard.status_code == 400 and wizard.json()["error"]["param"] == "messages[1][1].role"
    assert ok.status_code == 200 and ok.json()["policy_versions"] == [5]
    assert seen == [{"model": "m", "messages": [ok_chat], "cache_salt": "t:flywheel-v5"}]


def test_deeply_nested_json_is_a_400_not_a_500():
    """~1000 nested brackets overflow Python's JSON parser: the RecursionError used to escape the
    middleware as a 500 on /v1/completions and /v1/chat/completions, and vLLM's /invocations (which
    parses its body by hand) answered 500 too. Every OpenAI route refuses it before vLLM sees it."""
    seen: list = []
    app = middleware(seen, version=1)
    deep = '{"model": "m", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return [
                await http.post(path, content=deep, headers={"content-type": "application/json"})
                for path in ("/v1/completions", "/v1/chat/completions", "/invocations", "/tokenize")
            ]

    for r in asyncio.run(run()):
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "too deeply" in r.json()["error"]["message"]
    assert seen == []  # refused before vLLM


def test_versions_since_lists_pushes_not_a_range():
    policy = PolicyState(model="m", served_model_name="m")
    policy.publish(3)
    policy.publish(10**6)
    assert policy.versions_since(0) == [0, 3, 10**6]
    assert policy.versions_since(3) == [3, 10**6]
    for v in range(10**6 + 1, 10**6 + 500):
        policy.publish(v)
    assert len(policy.versions_since(0)) <= 101


def test_real_server_refuses_unknown_role_and_oversized_tokenize(server):
    r = httpx.post(
        server.base_url + "/chat/completions",
        timeout=60,
        json={"model": server.model, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        server.base_url + "/chat/completions/batch",
        timeout=60,
        json={"model": server.model, "messages": [[{"role": "wizard", "content": "hi"}]], "max_tokens": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0][0].role"
    r = httpx.post(
        server.base_url + "/chat/completions/batch",
        timeout=60,
        json={"model": server.model, "messages": [[{"role": "user", "content": "hi"}]], "max_tokens": 2},
    )
    assert r.status_code == 200 and r.json()["policy_versions"] == [0], r.text  # salted, accepted by vLLM
    r = httpx.post(server.url + "/tokenize", timeout=60, json={"model": server.model, "prompt": "word " * 1_000_000})
    assert r.status_code == 413
    r = httpx.post(server.url + "/tokenize", timeout=60, json={"model": server.model, "prompt": "a few words"})
    assert r.status_code == 200 and r.json()["count"] > 0
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        chunks = list(client.completions.create(model=server.model, prompt="data: {", max_tokens=4, stream=True))
    assert chunks and all(c.model_extra.get("policy_version") is not None for c in chunks)


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_real_server_accepts_the_salted_requests(server, salt):
    extra = {} if salt is None else {"cache_salt": salt}
    r = httpx.post(
        server.base_url + "/completions",
        timeout=60,
        json={"model": server.model, "prompt": "hello", "max_tokens": 2, **extra},
    )
    assert r.status_code == 200, r.text
