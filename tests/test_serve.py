"""`flywheel serve` through the official OpenAI SDK: the API works, versions are stamped, bad input is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from flywheel.clients import process_group
from flywheel.clients.servers import start_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_with_token_ids_and_logprobs(client, server):
    raw = client.chat.completions.with_raw_response.create(
        model=server.model,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True},
    )
    assert raw.headers["x-flywheel-policy-version"] == "0"
    assert raw.headers["x-flywheel-policy-versions"] == "0"
    resp = raw.parse()
    choice = resp.choices[0]
    assert resp.usage.completion_tokens == 6 == len(choice.logprobs.content)
    assert choice.finish_reason == "length"
    token_ids = choice.model_extra["token_ids"]
    assert len(token_ids) == 6 and all(isinstance(t, int) for t in token_ids)
    assert resp.model_extra["prompt_token_ids"][0] == 151644  # <|im_start|>: the real Qwen chat template
    assert resp.model_extra["policy_versions"] == [0]
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5  # greedy: the chosen token is the top one


def test_completion_seed_is_deterministic_and_n_samples(client, server):
    kwargs = dict(model=server.model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b
    many = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=4)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.usage.completion_tokens == 32


def test_streaming_with_usage_and_per_chunk_version(client, server):
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 5
    assert text
    assert all(c.model_extra.get("policy_version") == 0 for c in chunks)


def test_stop_sequence(client, server):
    free = client.completions.create(model=server.model, prompt="a b c", max_tokens=10, temperature=0).choices[0].text
    assert len(free) > 2
    stop = free[1:3]
    stopped = client.completions.create(model=server.model, prompt="a b c", max_tokens=10, temperature=0, stop=[stop])
    assert stopped.choices[0].text == free[: free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_status_route(server):
    status = httpx.get(server.url + "/flywheel/status").json()
    assert status["policy_version"] == 0
    assert status["served_model_name"] == server.model
    assert status["uptime_s"] > 0
    assert set(status["weights"]["transports"]) == {"shm", "http"}


@pytest.mark.parametrize(
    "call, status",
    [
        (
            lambda c, m: c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}]),
            404,
        ),
        (lambda c, m: c.completions.create(model=m, prompt="x", max_tokens=10**6), 400),
        (lambda c, m: c.completions.create(model=m, prompt="x", temperature=-1), 400),
    ],
)
def test_bad_requests_get_openai_errors(client, server, call, status):
    with pytest.raises(openai.APIStatusError) as info:
        call(client, server.model)
    assert info.value.status_code == status
    body = info.value.response.json()
    assert isinstance(body["error"], dict) and body["error"]["message"]
    assert info.value.response.headers["x-flywheel-policy-version"] == "0"
    # and the server still answers
    assert client.completions.create(model=server.model, prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_malformed_json_and_admin_token(server):
    r = httpx.post(server.base_url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "message" in r.json()["error"]
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/flywheel/admin/pause", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(server.url + "/flywheel/admin/weights/push", headers=headers, json={})
        assert r.status_code == 401
    assert httpx.get(server.url + "/flywheel/status").json()["paused"] is False


def test_pause_and_resume_with_admin_token(server):
    r = httpx.post(server.url + "/flywheel/admin/pause?mode=wait", headers=server.admin_headers)
    assert r.status_code == 200
    assert httpx.get(server.url + "/flywheel/status").json()["paused"] is True
    assert httpx.post(server.url + "/flywheel/admin/resume", headers=server.admin_headers).status_code == 200
    assert httpx.get(server.url + "/flywheel/status").json()["paused"] is False


def _group_alive(pgid: int) -> list[process_group.Member]:
    """Members of the group that still run (a zombie is dead, whoever has to reap it)."""
    return [m for m in process_group.members(pgid) if m.running]


def test_api_key_and_clean_shutdown(tiny_model, tmp_path):
    """A second server with --api-key: unauthenticated OpenAI calls fail; SIGTERM leaves no process behind."""
    with start_server(tiny_model, tmp_path, api_key="sk-test", served_model_name="keyed") as srv:
        no_key = openai.OpenAI(base_url=srv.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            no_key.models.list()
        assert info.value.response.json()["error"]["type"] == "authentication_error"
        keyed = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == ["keyed"]
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open for probes
        pgid = srv.process.pid
        assert len(_group_alive(pgid)) >= 2  # the API server and vLLM's engine core
        srv.process.send_signal(signal.SIGTERM)
        srv.process.wait(60)
        deadline = time.time() + 20
        while _group_alive(pgid) and time.time() < deadline:
            time.sleep(0.5)
        assert _group_alive(pgid) == []


def test_serve_cli_help_and_bad_model(tiny_model):  # tiny_model: prepared, as `flywheel models` must report
    env = {**os.environ}
    # the console script installed beside this interpreter: works from the README's command as written
    # (`.venv/bin/python -m pytest`, no venv activated), and tests the installed entry point itself
    flywheel = [str(Path(sys.executable).with_name("flywheel"))]
    out = subprocess.run([*flywheel, "serve", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    for flag in ("--model", "--admin-token", "--api-key", "--kv-cache-gib", "--enforce-eager", "--port"):
        assert flag in out.stdout
    bad = subprocess.run([*flywheel, "serve", "--model", "/nonexistent/model"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    assert "neither a bundled model" in bad.stderr and "Traceback" not in bad.stderr
    listed = subprocess.run([*flywheel, "models", "--json-output"], capture_output=True, text=True, env=env)
    names = {m["name"]: m for m in json.loads(listed.stdout)}
    assert names["tiny-qwen3"]["prepared"] is True and "smollm2-135m-instruct" in names
