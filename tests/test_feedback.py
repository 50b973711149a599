"""POST /v1/feedback on a real server (capture on, an API key), through the OpenAI SDK; the ratings
become GRPO rollouts (importance-corrected) and DPO pairs, both train a step and push a version.

One server for the whole file (slow on this CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
from openai import OpenAI

from flywheel.sampler.feedback import feedback_pairs, feedback_rollouts, rated
from flywheel.server.feedback import feedback_key
from flywheel.server.status import fetch_status

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]
USER_KEY = "user-key-123"


@pytest.fixture(scope="module")
def feedback_server(tiny_model, tmp_path_factory, redis_url):
    from flywheel.clients.servers import start_server

    with start_server(tiny_model, tmp_path_factory.mktemp("fb"), capture_redis_url=redis_url, api_key=USER_KEY) as srv:
        yield srv


def ask(client: OpenAI, model: str, seed: int):
    return client.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=8,
        temperature=1.0,
        seed=seed,
        logprobs=True,
        extra_body={"return_token_ids": True},
    )


def rate(client: OpenAI, **body):
    return client.post("/feedback", body=body, cast_to=object)


def test_feedback_lands_replaces_refuses_then_trains_grpo_and_dpo(
    feedback_server, tiny_model, redis_client, redis_url, tmp_path
):
    srv = feedback_server
    client = OpenAI(base_url=srv.base_url, api_key=USER_KEY, max_retries=0)
    good = ask(client, srv.model, seed=1)
    bad = next(
        r
        for seed in range(2, 12)
        if (r := ask(client, srv.model, seed)).choices[0].message.content != good.choices[0].message.content
    )

    # ratings land (a production route: the user's key, no admin token), right after the response
    first = rate(client, id=good.id, rating="up", comment="right")
    assert first == {"object": "feedback", "id": good.id, "choice_index": 0, "reward": 1.0, "replaced": False}
    assert rate(client, id=bad.id, rating=2)["reward"] == pytest.approx(0.25)  # (2 - 1) / (5 - 1)
    again = rate(client, id=bad.id, rating="down", preferred="2 + 2 = 4")
    assert again["replaced"] is True and again["reward"] == 0.0
    assert redis_client.hlen(feedback_key("prompts")) == 2  # the replaced rating counts once

    # bad input: clear 4xx JSON in the OpenAI envelope
    with pytest.raises(openai.NotFoundError) as e:
        rate(client, id="chatcmpl-nope", rating="up")
    assert e.value.status_code == 404 and e.value.body["param"] == "id" and "unknown or expired" in e.value.message
    for body, param in (
        ({"id": good.id, "rating": 6}, "rating"),
        ({"id": good.id, "rating": 0.5}, "rating"),
        ({"id": good.id, "rating": True}, "rating"),
        ({"id": good.id, "rating": "meh"}, "rating"),
        ({"id": good.id, "rating": "up", "choice_index": 1}, "choice_index"),
        ({"id": good.id}, "rating"),
        ({"id": good.id, "rating": "up", "stars": 5}, "stars"),
    ):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            rate(client, **body)
        assert e.value.status_code == 422 and e.value.body["param"] == param, (body, e.value.body)
    no_key = httpx.post(srv.base_url + "/feedback", json={"id": good.id, "rating": "up"})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert redis_client.hlen(feedback_key("prompts")) == 2
    assert fetch_status(srv.url).capture.feedback is True

    # (a) rewards for the rated rollouts: the server's own token ids, logprobs and version
    items = rated(redis_url)
    built = feedback_rollouts(items)
    assert built.skipped == []
    by_completion = {r.rewards[0].details["completion_id"]: r for r in built.records}
    for reply, reward in ((good, 1.0), (bad, 0.0)):
        record = by_completion[reply.id]
        choice = reply.choices[0]
        assert record.reward == reward and record.policy_versions == [0] and record.source == "production"
        assert record.completion_token_ids == choice.model_extra["token_ids"]
        assert record.prompt_token_ids == reply.model_extra["prompt_token_ids"]
        assert record.behavior_logprobs == pytest.approx([t.logprob for t in choice.logprobs.content])
        assert record.completion == choice.message.content
    assert len({r.group_id for r in built.records}) == 1  # one prompt: one GRPO group

    # (b) preference pairs: the up-rated over the down-rated answer, and the preferred text over its answer
    pairs = {(p["chosen"], p["rejected"]) for p in feedback_pairs(items)}
    assert pairs == {
        (good.choices[0].message.content, bad.choices[0].message.content),
        ("2 + 2 = 4", bad.choices[0].message.content),
    }

    # GRPO on the feedback, importance-corrected (TIS against the captured behaviour logprobs); push v1
    from flywheel.trainer.config import TrainConfig
    from flywheel.trainer.train import train

    grpo_dir = tmp_path / "grpo"
    state = train(
        TrainConfig(
            objective="grpo",
            model=str(tiny_model),
            from_feedback=redis_url,
            run_dir=grpo_dir,
            max_steps=1,
            batch_size=2,
            lr=1e-4,
            max_seq_len=256,
            micro_batch_tokens=512,
            push_url=srv.url,
            push_every=1,
            admin_token=srv.admin_token,
            grpo={"tis_cap": 2.0},
        )
    )
    metrics = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert state.step == 1 and metrics[-1]["completions"] == 2 and metrics[-1]["reward_mean"] == pytest.approx(0.5)
    assert 0.0 < metrics[-1]["tis_weight_mean"] <= 2.0 and metrics[-1]["grad_norm"] > 0
    assert fetch_status(srv.url).policy_version == 1

    # DPO on the pairs through the CLI: `flywheel train dpo --from-feedback`; push v2
    dpo_dir = tmp_path / "dpo"
    proc = subprocess.run(
        [
            sys.executable, "-m", "flywheel.clients.cli", "train", "dpo",
            "--from-feedback", redis_url, "--model", str(tiny_model), "--run-dir", str(dpo_dir),
            "--max-steps", "1", "--batch-size", "2", "--max-seq-len", "256", "--micro-batch-tokens", "512",
            "--push-url", srv.url, "--push-every", "1", "--admin-token", srv.admin_token,
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dpo = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert dpo["loss"] == pytest.approx(0.6931, abs=1e-3)  # first step: policy == reference, -log sigmoid(0)
    assert fetch_status(srv.url).policy_version == 2
    after = client.chat.completions.with_raw_response.create(model=srv.model, messages=PROMPT, max_tokens=2)
    assert after.headers["x-flywheel-policy-version"] == "2"


def test_feedback_route_refuses_json_nested_too_deeply(redis_url):
    """The route parses its own body: ~1000 nested brackets raised RecursionError there, a 500 (the
    middleware in front now refuses them too; this is the route alone)."""
    import asyncio

    from fastapi import FastAPI

    from flywheel.server.feedback import FEEDBACK_PATH, FeedbackStore
    from flywheel.server.feedback import router as feedback_router

    app = FastAPI()
    app.include_router(feedback_router)
    app.state.flywheel_feedback = FeedbackStore(redis_url, "prompts", (1.0, 5.0))

    async def post(content: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post(FEEDBACK_PATH, content=content, headers={"content-type": "application/json"})

    r = asyncio.run(post('{"id": ' + "[" * 100_000 + "]" * 100_000 + "}"))
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body must be a JSON object"
    r = asyncio.run(post('{"id": "x", "rating": 9}'))  # the route still answers real bodies
    assert r.status_code == 422 and r.json()["error"]["param"] == "rating"
