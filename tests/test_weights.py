"""Live weight updates against real servers: correctness vs a fresh server, atomicity, pause modes."""

from __future__ import annotations

import itertools
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from flywheel.clients.servers import start_server
from flywheel.server.weights.client import PushFailed, push_weights
from flywheel.server.weights.shm_buckets import ShmBuckets

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1 2 3 4", "Hello, my name is"]


def perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """Checkpoint B: the same architecture as A with every weight moved a little."""
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        sd = load_file(file)
        g = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items()}, str(file))
    return dst


def greedy(url: str, model: str) -> list[tuple[list[int], list[float]]]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    out = []
    for prompt in PROMPTS:
        c = client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=1, extra_body={"return_token_ids": True}
        ).choices[0]
        out.append((c.model_extra["token_ids"], c.logprobs.token_logprobs))
    return out


def assert_same(a, b, tol=1e-4):
    for (ids_a, lp_a), (ids_b, lp_b) in zip(a, b):
        assert ids_a == ids_b
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) <= tol


def status(url: str) -> dict:
    return httpx.get(url + "/flywheel/status").json()


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-qwen3-moe"])
def family(request, tmp_path_factory):
    """(A path, B path, reference outputs of a fresh server on B) for a dense and an MoE model."""
    from flywheel.server.models import resolve_model

    a = resolve_model(request.param)
    b = perturbed_copy(a, tmp_path_factory.mktemp("ckpt") / f"{request.param}-B", seed=7)
    with start_server(b, tmp_path_factory.mktemp("fresh-b"), served_model_name="m") as fresh:
        reference_b = greedy(fresh.url, "m")
    return a, b, reference_b


@pytest.fixture(scope="module")
def served_a(family, tmp_path_factory):
    a, b, reference_b = family
    with start_server(a, tmp_path_factory.mktemp("serve-a"), served_model_name="m") as srv:
        yield srv, a, b, reference_b


def test_push_b_equals_fresh_b_and_push_a_restores_a(served_a):
    srv, a, b, reference_b = served_a
    reference_a = greedy(srv.url, "m")
    assert reference_a != reference_b  # B really is a different model
    result = push_weights(srv.url, load_file(next(b.glob("*.safetensors"))), 1, srv.admin_token, transport="shm")
    assert result["version"] == 1 and result["transport"] == "shm"
    assert_same(greedy(srv.url, "m"), reference_b)
    # push A back over HTTP from the checkpoint folder: exactly A again
    assert push_weights(srv.url, a, 2, srv.admin_token, transport="http")["version"] == 2
    assert_same(greedy(srv.url, "m"), reference_a, tol=0.0)
    st = status(srv.url)
    assert st["policy_version"] == 2 and [u["version"] for u in st["updates"]] == [1, 2]


def test_reused_shm_buckets_carry_each_push(served_a):
    """A trainer's ShmBuckets: the second push overwrites the first push's files, and serves its own weights."""
    srv, a, b, reference_b = served_a
    reference_a = greedy(srv.url, "m")
    version = status(srv.url)["policy_version"]
    sd_a, sd_b = load_file(next(a.glob("*.safetensors"))), load_file(next(b.glob("*.safetensors")))
    with ShmBuckets() as buckets:
        push_weights(srv.url, sd_b, version + 1, srv.admin_token, transport="shm", buckets=buckets)
        assert_same(greedy(srv.url, "m"), reference_b)
        files = sorted(buckets.folder.iterdir())
        push_weights(srv.url, sd_a, version + 2, srv.admin_token, transport="shm", buckets=buckets)
        assert buckets.reused == 1 and sorted(buckets.folder.iterdir()) == files  # overwritten, not new files
        assert_same(greedy(srv.url, "m"), reference_a, tol=0.0)
    assert not buckets.folder.exists()


def test_bad_pushes_are_refused_and_a_keeps_serving(served_a, tmp_path):
    srv, a, b, _ = served_a
    before_version = status(srv.url)["policy_version"]
    before = greedy(srv.url, "m")
    good = load_file(next(b.glob("*.safetensors")))
    name = next(k for k in good if k.endswith("q_proj.weight"))
    cases = {
        "wrong shape": {**good, name: good[name][:, :-1].contiguous()},
        "unknown name": {**good, "model.layers.99.mlp.up_proj.weight": torch.zeros(2, 2)},
        "missing tensors": {k: v for k, v in good.items() if "layers.1." not in k},
        "int where float": {**good, name: good[name].to(torch.int32)},
    }
    for label, weights in cases.items():
        with pytest.raises(PushFailed) as info:
            push_weights(srv.url, weights, before_version + 1, srv.admin_token)
        assert info.value.status == 400, label
    # a truncated bucket named over shm
    whole = tmp_path / "whole.safetensors"
    save_file(good, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-1000])
    r = httpx.post(
        srv.url + "/flywheel/admin/weights/push",
        headers=srv.admin_headers,
        json={"version": before_version + 1, "transport": "shm", "buckets": [{"path": str(cut)}]},
    )
    assert r.status_code == 400 and "truncated" in r.json()["error"]["message"]
    # a bucket whose checksum does not match
    r = httpx.put(
        srv.url + "/flywheel/admin/weights/buckets/p1/0",
        content=whole.read_bytes(),
        headers={**srv.admin_headers, "x-flywheel-sha256": "0" * 64},
    )
    assert r.status_code == 400 and "checksum" in r.json()["error"]["message"]
    # stale and duplicate versions
    with pytest.raises(PushFailed) as info:
        push_weights(srv.url, good, before_version, srv.admin_token)
    assert info.value.status == 409
    # no token
    r = httpx.post(
        srv.url + "/flywheel/admin/weights/push", json={"version": 99, "transport": "shm", "buckets": [{"path": "/x"}]}
    )
    assert r.status_code == 401
    assert status(srv.url)["policy_version"] == before_version
    assert_same(greedy(srv.url, "m"), before, tol=0.0)


PUSHER = r"""
import sys, time, httpx
url, token, path = sys.argv[1:4]
data = open(path, "rb").read()
def body():
    yield data[: len(data) // 2]
    print("HALF", flush=True)
    time.sleep(600)
    yield data[len(data) // 2:]
import hashlib
httpx.put(url + "/flywheel/admin/weights/buckets/killed/0", content=body(), timeout=600,
          headers={"authorization": "Bearer " + token, "x-flywheel-sha256": hashlib.sha256(data).hexdigest(),
                   "content-length": str(len(data))})
"""


def test_pusher_killed_mid_transfer_changes_nothing(served_a, tmp_path):
    srv, a, b, _ = served_a
    before_version = status(srv.url)["policy_version"]
    before = greedy(srv.url, "m")
    bucket = tmp_path / "b.safetensors"
    save_file(load_file(next(b.glob("*.safetensors"))), str(bucket))
    proc = subprocess.Popen(
        [sys.executable, "-c", PUSHER, srv.url, srv.admin_token, str(bucket)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "HALF"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # the half bucket can never be committed, and nothing changed
    r = httpx.post(
        srv.url + "/flywheel/admin/weights/push",
        headers=srv.admin_headers,
        json={
            "version": before_version + 1,
            "transport": "http",
            "push_id": "killed",
            "buckets": [{"index": 0, "sha256": "0" * 64}],
        },
    )
    assert r.status_code == 400 and "not uploaded" in r.json()["error"]["message"]
    assert status(srv.url)["policy_version"] == before_version
    assert_same(greedy(srv.url, "m"), before, tol=0.0)


def _stream(url: str, out: dict, go: threading.Barrier, max_tokens: int):
    """One long streamed completion; `out` gets its chunks' versions, timings and finish reason as they come."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    out.update(versions=[], chunks=0, finish=None)
    go.wait()  # every client is built before any request is sent: the streams start together
    out["t_sent"] = time.monotonic()
    try:
        for chunk in client.completions.create(
            model="m",
            prompt="Tell a long story",
            max_tokens=max_tokens,
            temperature=1.0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            out["started"].set()
            out["versions"].append(chunk.model_extra.get("policy_version"))
            if chunk.choices:
                out["chunks"] += 1
                out["finish"] = chunk.choices[0].finish_reason or out["finish"]
    except openai.APIError as exc:  # an aborted stream may end with an error event
        out["finish"] = f"error: {exc}"
    out["t_end"] = time.monotonic()
    out["started"].set()


def _start_streams(srv, n: int, max_tokens: int) -> tuple[list[dict], list[threading.Thread]]:
    go = threading.Barrier(n)
    results = [{"started": threading.Event()} for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(srv.url, out, go, max_tokens)) for out in results]
    for t in threads:
        t.start()
    for out in results:
        assert out["started"].wait(120)
    return results, threads


def _freeze(srv, results: list[dict]) -> bool:
    """Admin pause (keep), then let the client catch up on what was generated before it took hold.

    On 2 busy cores the pause can take seconds to reach the engine while the streams run on, so
    whether every stream is still in flight is read off the streams afterwards, not assumed."""
    r = httpx.post(srv.url + "/flywheel/admin/pause", params={"mode": "keep"}, headers=srv.admin_headers, timeout=120)
    assert r.status_code == 200, r.text
    counts, still = None, 0
    while still < 4:  # the engine is frozen: counts stop moving once the client has read everything
        time.sleep(0.25)
        now = [(out["chunks"], "t_end" in out) for out in results]
        still = still + 1 if now == counts else 0
        counts = now
    return not any(done for _, done in counts)


def _streams_during_push(srv, weights, version, mode, n=4, max_tokens=400, freeze_first=False, attempts=3):
    """Start n streams together, optionally freeze them in flight (admin pause, keep), push with `mode`.

    Returns (push result, per-stream results, what the streams looked like when the push began)."""
    for _ in range(attempts):
        results, threads = _start_streams(srv, n, max_tokens)
        if not freeze_first or _freeze(srv, results):
            break
        # a stream finished before the freeze held: this attempt shows nothing; let them go and retry
        httpx.post(srv.url + "/flywheel/admin/resume", headers=srv.admin_headers).raise_for_status()
        for t in threads:
            t.join(300)
    else:
        pytest.fail(f"on {attempts} attempts a stream of {max_tokens} tokens finished before the admin pause held")
    at_push = [{"chunks": out["chunks"], "done": "t_end" in out} for out in results]
    pushed = push_weights(srv.url, weights, version, srv.admin_token, pause_mode=mode)
    if freeze_first:  # a push keeps an admin's pause (issue 16): the admin who froze the streams lets them go
        assert httpx.get(srv.url + "/flywheel/status", timeout=60).json()["paused"] is True
        httpx.post(srv.url + "/flywheel/admin/resume", headers=srv.admin_headers, timeout=120).raise_for_status()
    for t in threads:
        t.join(300)
    return pushed, results, at_push


def _summary(results: list[dict], at_push: list[dict]) -> str:
    """What each stream did, for assertion messages (versions run-length encoded)."""
    lines = []
    for r, p in zip(results, at_push):
        runs = [[version, len(list(chunks))] for version, chunks in itertools.groupby(r["versions"])]
        took = r.get("t_end", 0) - r.get("t_sent", 0)
        lines.append(f"chunks={r['chunks']} finish={r['finish']!r} versions={runs} at_push={p} took={took:.2f}s")
    return "\n".join(lines)


LONG = 1000  # tokens per stream: the test servers' max_model_len is 1024


def test_keep_mode_streams_complete_across_the_push(served_a):
    srv, a, b, _ = served_a
    v = status(srv.url)["policy_version"]
    # frozen first, so that no stream can finish before the push on a fast machine; the push's own keep-pause
    # then finds them in flight and they resume under the new weights
    pushed, results, at_push = _streams_during_push(srv, b, v + 1, "keep", max_tokens=LONG, freeze_first=True)
    info = _summary(results, at_push)
    print(info)
    assert pushed["version"] == v + 1
    for r in results:
        assert r["finish"] == "length" and r["chunks"] == LONG, info
        assert set(r["versions"]) <= {v, v + 1}, info
        assert r["versions"] == sorted(r["versions"]), info  # old weights up to the push, new ones after
    # every stream was generated by both versions (it had started before the push), and says so
    assert all({v, v + 1} <= set(r["versions"]) for r in results), info


def test_wait_mode_drains_before_the_push(served_a):
    srv, a, b, _ = served_a
    v = status(srv.url)["policy_version"]
    pushed, results, at_push = _streams_during_push(srv, a, v + 1, "wait", n=2, max_tokens=150)
    info = _summary(results, at_push)
    assert pushed["version"] == v + 1
    for r in results:
        assert r["finish"] == "length", info
        assert set(r["versions"]) == {v}, info  # every token came from the old weights


def test_abort_mode_aborts_in_flight(served_a):
    srv, a, b, _ = served_a
    v = status(srv.url)["policy_version"]
    # the streams are frozen (admin pause, keep) first: the abort push must still abort them, and resume after
    pushed, results, at_push = _streams_during_push(srv, b, v + 1, "abort", n=2, max_tokens=LONG, freeze_first=True)
    info = _summary(results, at_push)
    print(info)
    assert pushed["version"] == v + 1
    for r in results:
        assert r["chunks"] < LONG and (r["finish"] == "abort" or r["finish"].startswith("error")), info
    assert status(srv.url)["paused"] is False  # the push resumed the engine it found paused


def test_gpu_transport_commits_are_checked_like_bucket_pushes(served_a):
    """nccl/ipc commits go through the same checks before the engine is touched (this CPU server enables neither)."""
    srv, a, b, _ = served_a
    v = status(srv.url)["policy_version"]
    sd = load_file(next(a.glob("*.safetensors")))
    tensors = {
        "names": list(sd),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in sd.values()],
        "shapes": [list(t.shape) for t in sd.values()],
    }
    url = srv.url + "/flywheel/admin/weights/push"
    r = httpx.post(url, headers=srv.admin_headers, json={"version": v, "transport": "nccl", "tensors": tensors})
    assert r.status_code == 409  # stale version first, whatever the transport
    r = httpx.post(url, headers=srv.admin_headers, json={"version": v + 1, "transport": "nccl", "tensors": tensors})
    assert r.status_code == 400 and "not enabled" in r.json()["error"]["message"]
    r = httpx.post(url, headers=srv.admin_headers, json={"version": v + 1, "transport": "ipc", "tensors": tensors})
    assert r.status_code == 400 and "ipc_handles" in r.json()["error"]["message"]  # not a push at all
    r = httpx.post(
        url, headers=srv.admin_headers, json={"version": v + 1, "transport": "rdma", "buckets": [{"path": "/x"}]}
    )
    assert r.status_code == 400 and "transport" in r.json()["error"]["message"]
    st = status(srv.url)
    assert st["policy_version"] == v and st["weights"]["backend"] == "flywheel" and st["weights"]["workers"] == 1
