"""GPU only: `flywheel serve` on a CUDA device, with a learner's CUDA-IPC push from the same GPU.

Two servers share the GPU (each at a small --gpu-memory-utilization): one serving checkpoint A that
receives the pushes, and a fresh one serving checkpoint B as the reference. The learner side is this
test process: it holds B (or A) as an HF model on the GPU and pushes its state dict over CUDA IPC
(`push_weights(..., transport="ipc")`): the server maps the tensors, validates and loads them
through vLLM's IPC engine. Checked: the device defaults, the version contract, pushed B == fresh B
(greedy ids and logprobs), A restored, the refusals of the CPU server (shape, name, stale version)
plus NaN/Inf, each leaving the served weights and version as they were, and a bucket push on a GPU.

Run on the GPU machine: `python -m pytest -q -m gpu tests/test_gpu_serve.py`.
"""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from flywheel.clients.servers import start_server
from flywheel.server.weights.client import PushFailed, push_weights
from tests.test_weights import assert_same, greedy, perturbed_copy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Same engine, same weights: only the prefix cache (hit or not) and batch shapes differ, which in
# bf16 can move a logprob in its third decimal; the greedy ids must be equal.
TOL = 2e-2
GPU_SERVER = {"served_model_name": "m", "gpu_memory_utilization": 0.15, "enforce_eager": True, "dtype": "bfloat16"}


def status(url: str) -> dict:
    return httpx.get(url + "/flywheel/status", timeout=30).json()


def hf_state_dict(folder) -> dict[str, torch.Tensor]:
    """What a learner holds: the checkpoint as an HF model on the GPU, in the served dtype."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def gpu_servers(tiny_model, tmp_path_factory):
    a = tiny_model
    b = perturbed_copy(a, tmp_path_factory.mktemp("ckpt") / "B", seed=7)
    with (
        start_server(b, tmp_path_factory.mktemp("fresh-b"), **GPU_SERVER) as fresh,
        start_server(a, tmp_path_factory.mktemp("serve-a"), **GPU_SERVER) as srv,
    ):
        yield srv, fresh, a, b


def test_gpu_server_defaults_and_version_contract(gpu_servers):
    srv, _, _, _ = gpu_servers
    st = status(srv.url)
    assert st["policy_version"] == 0
    assert "ipc" in st["weights"]["transports"] and st["weights"]["backend"] == "flywheel_ipc"
    r = httpx.post(
        srv.base_url + "/chat/completions",
        timeout=60,
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert r.status_code == 200 and r.headers["x-flywheel-policy-version"] == "0"
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_ipc_push_b_equals_fresh_b_then_push_a_restores_a(gpu_servers):
    srv, fresh, a, b = gpu_servers
    reference_a, reference_b = greedy(srv.url, "m"), greedy(fresh.url, "m")
    assert reference_a != reference_b
    v = status(srv.url)["policy_version"]
    result = push_weights(srv.url, hf_state_dict(b), v + 1, srv.admin_token, transport="ipc")
    assert result["version"] == v + 1 and status(srv.url)["policy_version"] == v + 1
    assert_same(greedy(srv.url, "m"), reference_b, tol=TOL)
    push_weights(srv.url, hf_state_dict(a), v + 2, srv.admin_token, transport="ipc")
    assert_same(greedy(srv.url, "m"), reference_a, tol=TOL)
    assert [u["transport"] for u in status(srv.url)["updates"][-2:]] == ["ipc", "ipc"]


def test_ipc_refusals_keep_the_served_weights(gpu_servers):
    srv, _, a, _ = gpu_servers
    v = status(srv.url)["policy_version"]
    before = greedy(srv.url, "m")
    good = hf_state_dict(a)
    name = next(k for k in good if k.endswith("q_proj.weight"))
    bad_pushes = {
        "shape": {**good, name: torch.zeros(3, 3, device="cuda", dtype=torch.bfloat16)},
        "name": {
            **good,
            "model.layers.0.self_attn.nope.weight": good[name].clone(),
        },  # a clone: push_weights sends one tensor per storage
        "nan": {**good, name: torch.full_like(good[name], math.nan)},
        "inf": {**good, name: good[name].clone().index_fill_(0, torch.tensor([0], device="cuda"), math.inf)},
    }
    outcomes = {}
    for what, weights in bad_pushes.items():
        try:
            outcomes[what] = ("applied", push_weights(srv.url, weights, v + 1, srv.admin_token, transport="ipc"))
            v = status(srv.url)["policy_version"]
        except PushFailed as exc:
            outcomes[what] = (exc.status, exc.message)
    assert all(status == 400 for status, _ in outcomes.values()), outcomes
    for what in ("nan", "inf"):
        assert "NaN or Inf" in outcomes[what][1] and name in outcomes[what][1], outcomes[what]
    with pytest.raises(PushFailed) as info:  # not newer than what is served
        push_weights(srv.url, good, v, srv.admin_token, transport="ipc")
    assert info.value.status == 409
    with pytest.raises(ValueError, match="moves CUDA tensors"):
        push_weights(srv.url, {k: t.cpu() for k, t in good.items()}, v + 1, srv.admin_token, transport="ipc")
    st = status(srv.url)
    assert st["policy_version"] == v and not st.get("broken")
    assert_same(greedy(srv.url, "m"), before, tol=TOL)


def test_bucket_push_into_a_gpu_server(gpu_servers):
    """shm buckets (the CPU transport) work into a GPU server too: B by folder, then A again."""
    srv, fresh, a, b = gpu_servers
    reference_b = greedy(fresh.url, "m")
    v = status(srv.url)["policy_version"]
    push_weights(srv.url, b, v + 1, srv.admin_token, transport="shm")
    assert_same(greedy(srv.url, "m"), reference_b, tol=TOL)
    push_weights(srv.url, a, v + 2, srv.admin_token, transport="shm")
    assert status(srv.url)["policy_version"] == v + 2
