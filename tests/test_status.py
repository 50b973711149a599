"""server/status.py owns the status / policy-version contract: what the server sends is what clients read."""

from __future__ import annotations

import httpx
from openai import OpenAI

from flywheel.server.status import (
    VERSION_HEADER,
    VERSIONS_HEADER,
    ServerStatus,
    fetch_status,
    response_version,
    response_versions,
)


def test_versions_come_from_the_headers_then_the_body():
    assert response_versions(
        httpx.Headers({VERSIONS_HEADER: "3,4", VERSION_HEADER: "4"}), {"policy_versions": [9]}
    ) == [3, 4]
    assert response_versions(httpx.Headers({VERSION_HEADER: "4"}), {"policy_versions": [9]}) == [4]
    assert response_versions(httpx.Headers(), {"policy_versions": [9]}) == [9]
    assert response_versions(httpx.Headers(), {}) == []  # any non-Flywheel endpoint
    assert response_version(httpx.Headers({VERSION_HEADER: "7"})) == 7
    assert response_version(httpx.Headers({VERSION_HEADER: "x"})) is None and response_version(httpx.Headers()) is None


def test_a_client_reads_fields_it_does_not_know():
    status = ServerStatus.model_validate(
        {
            "model": "m",
            "served_model_name": "m",
            "policy_version": 2,
            "started_at": 1.0,
            "uptime_s": 1.0,
            "weights": {"workers": 2, "new_setting": 1},
            "new_field": True,
        }
    )
    assert status.weights.workers == 2 and status.policy_version == 2


def test_the_server_speaks_the_contract(server):
    status = fetch_status(server.base_url)  # a trailing /v1 is ignored
    assert status.policy_version == 0 and status.served_model_name == server.model
    assert set(status.weights.transports) == {"shm", "http"} and status.weights.workers == 1
    raw = OpenAI(base_url=server.base_url, api_key="none").completions.with_raw_response.create(
        model=server.model, prompt="hi", max_tokens=2
    )
    assert response_version(raw.headers) == 0 and response_versions(raw.headers, {}) == [0]
