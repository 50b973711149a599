"""Production capture: the ASGI middleware in front of an ASGI app, real Redis, and the sampler reading it back."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import msgpack
import pytest

from flywheel.sampler.queue import PromptQueue
from flywheel.server.capture import CapturedRequest, CaptureFormatError, CaptureMiddleware
from flywheel.server.policy import PolicyState
from tests.asgi import read_body


async def openai_like_app(scope, receive, send):
    """Answers like vLLM's routes: a JSON completion, or SSE chunks when stream=true."""
    body = await read_body(receive)
    request = json.loads(body)
    if request.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i, piece in enumerate(["Hel", "lo", " world"]):
            chunk = {
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": "stop" if i == 2 else None}]
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    out = json.dumps(
        {
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Answer: 4"}, "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": "5"}, "finish_reason": "length"},
            ]
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "2+2? mail me at bob@example.com"}],
    "temperature": 0.7,
    "max_tokens": 8,
    "n": 2,
}


async def post(app, payload, path="/v1/chat/completions"):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.post(path, json=payload)


def entries(redis_client, stream="prompts"):
    return [CapturedRequest.from_bytes(f[b"r"]) for _, f in redis_client.xrange(stream)]


def test_captures_json_and_stream_responses(redis_client, redis_url):
    policy = PolicyState(model="m", served_model_name="m", version=3)
    app = CaptureMiddleware(openai_like_app, redis_url=redis_url, stream="prompts", policy=policy)

    async def go():
        plain = await post(openai_like_app, CHAT)
        captured = await post(app, CHAT)
        assert captured.content == plain.content and captured.headers == plain.headers  # response untouched
        streamed = await post(app, {**CHAT, "stream": True, "n": 1})
        assert "Hel" in streamed.text
        await post(app, {"model": "m", "prompt": "1+1=", "max_tokens": 2}, path="/v1/completions")
        await post(app, CHAT, path="/v1/models")  # not a generation route: ignored
        await app.drain()

    asyncio.run(go())
    got = {(e.endpoint, e.stream): e for e in entries(redis_client)}  # background writes may land in any order
    chat, stream, completion = got["chat", False], got["chat", True], got["completions", False]
    assert chat.endpoint == "chat" and chat.messages == CHAT["messages"] and chat.model == "m"
    assert chat.sampling == {"temperature": 0.7, "max_tokens": 8, "n": 2}
    assert chat.responses == ["Answer: 4", "5"] and chat.finish_reasons == ["stop", "length"]
    assert chat.policy_version == 3 and chat.policy_versions == [3] and not chat.stream
    assert stream.stream and stream.responses == ["Hello world"] and stream.finish_reasons == ["stop"]
    assert completion.endpoint == "completions" and completion.prompt == "1+1=" and completion.messages is None
    assert app.counters["captured"] == 3 and app.counters["errors"] == 0


def test_rate_zero_captures_nothing(redis_client, redis_url):
    app = CaptureMiddleware(openai_like_app, redis_url=redis_url, rate=0.0)

    async def go():
        for _ in range(5):
            assert (await post(app, CHAT)).status_code == 200
        await app.drain()

    asyncio.run(go())
    assert redis_client.xlen("prompts") == 0 and app.counters["skipped"] == 5


def mask_emails(record: CapturedRequest) -> CapturedRequest:
    for m in record.messages or []:
        m["content"] = re.sub(r"\S+@\S+", "<email>", m["content"])
    return record


def drop_all(record):
    return None


def test_redaction_hook_by_dotted_path(redis_client, redis_url):
    masked = CaptureMiddleware(openai_like_app, redis_url=redis_url, redact="tests.test_capture:mask_emails")
    dropped = CaptureMiddleware(openai_like_app, redis_url=redis_url, redact="tests.test_capture.drop_all")

    async def go():
        await post(masked, CHAT)
        await post(dropped, CHAT)
        await masked.drain()
        await dropped.drain()

    asyncio.run(go())
    [only] = entries(redis_client)
    assert only.messages[0]["content"] == "2+2? mail me at <email>" and only.redacted
    assert dropped.counters["dropped_by_redact"] == 1
    with pytest.raises((ImportError, AttributeError)):
        CaptureMiddleware(openai_like_app, redis_url=redis_url, redact="tests.test_capture:no_such_hook")


def test_redis_down_never_breaks_or_slows_responses(caplog):
    from flywheel.server.net import free_port

    app = CaptureMiddleware(openai_like_app, redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)

    async def go():
        start = time.monotonic()
        replies = [await post(app, CHAT) for _ in range(3)]
        elapsed = time.monotonic() - start
        await app.drain()
        return replies, elapsed

    replies, elapsed = asyncio.run(go())
    assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Answer: 4" for r in replies)
    assert elapsed < 0.5  # the failing writes happen after the responses, in the background
    assert app.counters["errors"] == 3 and app.counters["captured"] == 0
    assert any("capture failed" in r.message for r in caplog.records)


def test_sampler_reads_prompts_stream_and_dead_letters_bad_entries(redis_client, redis_url):
    app = CaptureMiddleware(openai_like_app, redis_url=redis_url)

    async def go():
        await post(app, CHAT)
        await app.drain()

    q = PromptQueue(url=redis_url)  # stream 'prompts', group 'sampler'
    asyncio.run(go())
    redis_client.xadd("prompts", {"r": b"\x00garbage"})
    redis_client.xadd(
        "prompts", {"r": msgpack.packb({**CapturedRequest(endpoint="chat").model_dump(), "schema_version": 7})}
    )
    got = q.get(count=10, block_s=0.1)
    assert len(got) == 1 and got[0].record.messages == CHAT["messages"]
    q.ack(got)
    reasons = [d["reason"] for d in q.dead_letters()]
    assert len(reasons) == 2 and "not msgpack" in reasons[0] and "schema_version 7" in reasons[1]
    with pytest.raises(CaptureFormatError, match="schema_version"):
        CapturedRequest.from_bytes(msgpack.packb({"schema_version": 2, "endpoint": "chat"}))


def test_a_request_opted_out_by_header_is_never_written(redis_client, redis_url):
    app = CaptureMiddleware(openai_like_app, redis_url=redis_url, stream="prompts", link_ttl_s=60)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            secret = {**CHAT, "messages": [{"role": "user", "content": "my secret"}]}
            quiet = await client.post("/v1/chat/completions", json=secret, headers={"X-Flywheel-Capture": "off"})
            loud = await client.post("/v1/chat/completions", json=CHAT, headers={"x-flywheel-capture": "on"})
        await app.drain()
        return quiet, loud

    quiet, loud = asyncio.run(go())
    assert quiet.status_code == loud.status_code == 200 and quiet.json() == loud.json()  # answered alike
    assert [e.messages for e in entries(redis_client)] == [CHAT["messages"]]
    assert app.counters["opted_out"] == 1 and app.counters["captured"] == 1
    assert not any(b"my secret" in (redis_client.dump(k) or b"") for k in redis_client.scan_iter())
