"""StagedApply (the CPU fast path of a push) against vLLM's own layerwise reload, on one engine.

The probe runs in its own process (an in-process vLLM engine, no server): tests/weight_apply_probe.py.
Outputs are greedy token ids and their logprobs; "equal" here means bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.clients.servers import vllm_lock
from flywheel.server.weights.protocol import OLD_WEIGHTS_KEPT

PROBE = Path(__file__).with_name("weight_apply_probe.py")


# MoE through the staged path is also covered by tests/test_weights.py on a real server; here it is slow
@pytest.fixture(scope="module", params=["tiny-qwen3", pytest.param("tiny-qwen3-moe", marks=pytest.mark.slow)])
def probe(request) -> dict:
    from flywheel.server.models import resolve_model

    with vllm_lock():
        done = subprocess.run(
            [sys.executable, str(PROBE), str(resolve_model(request.param))], capture_output=True, text=True, timeout=600
        )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert done.returncode == 0 and line, f"probe failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(line.removeprefix("RESULT "))


def test_staged_path_is_the_one_used(probe):
    assert probe["unsupported"] is None


def test_staged_equals_layerwise_reload(probe):
    assert probe["staged_b"] != probe["a"]  # B is a different model
    assert probe["staged_b"] == probe["layerwise_b"]
    assert probe["layerwise_a"] == probe["a"]


def test_staged_restores_a_exactly(probe):
    assert probe["staged_a"] == probe["a"]


def test_a_failure_while_loading_keeps_the_old_weights(probe):
    assert probe["failure"] is not None and OLD_WEIGHTS_KEPT in probe["failure"]
    assert "bucket vanished mid-push" in probe["failure"]
    assert probe["after_failure"] == probe["a"]  # half of B was loaded into staging, none served
    assert probe["staged_b_again"] == probe["staged_b"]  # and the next push applies whole
