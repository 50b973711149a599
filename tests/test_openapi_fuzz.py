"""Schemathesis over the live OpenAPI schema of `flywheel serve` (issue 16, item 15): no answer >= 500.

Every operation that the server's /openapi.json lists (vLLM's routes and ours) gets MAX_EXAMPLES
(without a token NO_TOKEN_EXAMPLES) generated requests of each kind schemathesis makes, schema-valid
(positive) and schema-violating (negative), with a fixed seed (hypothesis `derandomize`), in two passes
over one server (capture on, an API key set):
  - with the admin token (it is also a valid API key): every route does its real work on fuzzed input
    and must not answer >= 500;
  - with no token: nothing >= 500 either, every admin operation (the middleware's rule) answers 401/403
    and every OpenAI route 401.
A failing run lists each 5xx (or wrong auth answer) with a curl command that reproduces it.

Schemathesis's pytest integration (`from_fixture` / `@schema.parametrize`) crashes on pytest 9
(`_nodeid`), so each operation runs as a plain hypothesis `@given(operation.as_strategy())` loop.

Cost is bounded by the server's configuration, not by leaving inputs out: max_model_len=64 caps prompt
+ generated tokens of every request (a fuzzed max_tokens above it is a 400), VLLM_MAX_N_SEQUENCES=4 caps
`n`, max_num_seqs=4 the batch. Excluded, in the admin pass only: vLLM's elastic expert-parallel routes.
/scale_elastic_ep with the token drains the engine (up to its drain_timeout, 120 s by default) and
re-sizes the data-parallel group, which this one-engine server does not have: not something to do to
the server under test (and its failure is vLLM's "Scale failed" 500); /is_scaling_elastic_ep is its
status companion. Without the token both are fuzzed like every other admin route (401). A fuzzed pause
is resumed at once.
"""

from __future__ import annotations

import collections
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from flywheel.clients.servers import start_server
from flywheel.server.middleware import OPENAI_PREFIXES, is_admin_request

MAX_EXAMPLES = 25
# Without a token every admin and OpenAI route answers 401 before it reads the body (whose fuzzing is
# the admin pass's job), so fewer examples say as much; their cost is hypothesis generating the bodies.
NO_TOKEN_EXAMPLES = 10
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
STOPS_THE_SERVER = {("POST", "/scale_elastic_ep"), ("POST", "/is_scaling_elastic_ep")}
PAUSE = ("POST", "/flywheel/admin/pause")
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same requests on every run: a CI failure reproduces locally
    database=None,
    deadline=None,  # a generation request may take a second; only 5xx matter here
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each 5xx is reported as it was found
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory, redis_url):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_MAX_N_SEQUENCES", "4")  # read by the server process vLLM starts
        with start_server(
            tiny_model,
            tmp_path_factory.mktemp("fuzz"),
            served_model_name="m",
            max_model_len=64,
            max_num_seqs=4,
            capture_redis_url=redis_url,  # capture and /v1/feedback see the fuzzed traffic too
            api_key="fuzz-user-key",  # the pass without a token then checks the OpenAI routes' auth as well
        ) as server:
            yield server


@pytest.fixture(scope="module")
def schema(srv):
    return schemathesis.openapi.from_url(srv.url + "/openapi.json", timeout=60)


def operations(schema) -> list:
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) > 20, [f"{op.method} {op.path}" for op in ops]  # vLLM's routes and ours, not an empty schema
    return ops


def fuzz(srv, operation, headers: dict, mode, on_answer, examples: int) -> collections.Counter:
    """`examples` cases of `operation` in `mode`, each sent to the server and handed to on_answer(case, response)
    (response None when the request itself failed: the server closed the connection or did not answer)."""
    statuses: collections.Counter = collections.Counter()

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(operation.as_strategy(generation_mode=mode))
    def run(case):
        try:
            response = case.call(base_url=srv.url, headers=headers, timeout=60)
        except Exception as exc:  # a reset or timeout: the server crashed or hangs, what this test is after
            statuses[type(exc).__name__] += 1
            on_answer(case, None, exc)
            return
        statuses[response.status_code] += 1
        on_answer(case, response, None)
        if (case.method.upper(), operation.path) == PAUSE and response.status_code < 300:
            httpx.post(srv.url + "/flywheel/admin/resume", headers=srv.admin_headers, timeout=60).raise_for_status()

    try:
        run()
    except Unsatisfiable:
        pass  # negative mode: an operation without parameters or body has no invalid request to make
    return statuses


def describe(case, response, exc, headers: dict) -> str:
    what = f"{response.status_code} {response.text[:300]!r}" if response is not None else f"no answer: {exc!r}"[:300]
    return f"{case.method.upper()} {case.operation.path} -> {what}\n    {case.as_curl_command(headers=headers)[:600]}"


def fuzz_all(srv, schema, headers: dict, judge, examples: int) -> tuple[list[str], dict]:
    """Every operation, both modes; `judge(case, response)` says what is wrong with an answer (None: fine)."""
    problems, seen = [], {}
    for operation in operations(schema):
        key = (operation.method.upper(), operation.path)
        if headers and key in STOPS_THE_SERVER:
            continue

        def on_answer(case, response, exc):
            wrong = "no answer" if response is None else judge(case, response)
            if wrong:
                problems.append(f"[{wrong}] " + describe(case, response, exc, headers))

        for mode in MODES:
            t0 = time.monotonic()
            seen[(*key, mode.value)] = dict(fuzz(srv, operation, headers, mode, on_answer, examples))
            seen[(*key, mode.value)]["s"] = round(time.monotonic() - t0, 1)
    return problems, seen


def still_serving(srv) -> None:
    status = httpx.get(srv.url + "/flywheel/status", timeout=30).json()
    assert status["paused"] is False
    r = httpx.post(
        srv.base_url + "/completions",
        json={"model": "m", "prompt": "hi", "max_tokens": 2},
        headers=srv.admin_headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text


def server_error(case, response) -> str | None:
    return f"{response.status_code} >= 500" if response.status_code >= 500 else None


def test_fuzzed_requests_with_the_admin_token_get_no_5xx(srv, schema):
    problems, seen = fuzz_all(srv, schema, srv.admin_headers, server_error, MAX_EXAMPLES)
    print("\n".join(f"{k}: {v}" for k, v in seen.items()))
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(problems)
    assert any(200 in v for (m, path, _), v in seen.items() if path == "/v1/chat/completions")  # real generations
    assert any(200 in v for (m, path, _), v in seen.items() if path == "/flywheel/admin/pause")
    still_serving(srv)


def test_fuzzed_requests_without_a_token_get_no_5xx_and_no_admin_access(srv, schema):
    def judge(case, response):
        if response.status_code >= 500:
            return f"{response.status_code} >= 500"
        method, path = case.method.upper(), case.operation.path
        if is_admin_request(method, path) and response.status_code not in (401, 403):
            return f"admin route answered {response.status_code} without a token"
        if path.startswith(OPENAI_PREFIXES) and response.status_code != 401:
            return f"OpenAI route answered {response.status_code} without the API key"
        return None

    problems, seen = fuzz_all(srv, schema, {}, judge, NO_TOKEN_EXAMPLES)
    print("\n".join(f"{k}: {v}" for k, v in seen.items()))
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(problems)
    admin = {path for (m, path, _) in seen if is_admin_request(m, path)}
    assert {"/flywheel/admin/pause", "/flywheel/admin/weights/push", "/scale_elastic_ep"} <= admin
    assert {"/v1/completions", "/v1/chat/completions/batch", "/tokenize"} <= {p for (_, p, _) in seen}
    still_serving(srv)


def test_json_nested_too_deeply_is_a_4xx_on_every_json_route(srv, schema):
    """What the fuzzer does not generate: ~1000 nested brackets overflow Python's JSON parser, and the
    RecursionError answered 500 on /v1/completions and /v1/chat/completions (the middleware's rewrite),
    /invocations (vLLM's, parses by hand) and /v1/feedback (ours, likewise). Every POST route without
    path parameters, with the admin token so that each one gets as far as parsing the body."""
    deep = '{"model": "m", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    stops = {path for _, path in STOPS_THE_SERVER}
    paths = [op.path for op in operations(schema) if op.method.upper() == "POST" and "{" not in op.path]
    paths = [p for p in paths if p not in stops]
    answers = {}
    for path in paths:
        headers = {**srv.admin_headers, "content-type": "application/json"}
        answers[path] = httpx.post(srv.url + path, content=deep, headers=headers, timeout=60).status_code
    assert {p for p, status in answers.items() if status >= 500} == set(), answers
    assert {"/v1/completions", "/invocations", "/v1/feedback"} <= set(answers)
    still_serving(srv)
