"""A restarted `flywheel serve` comes back with the last published version, never the base weights (issue 16 defect 5).

Two unit tests of the record and its pins, then one slow test with its own server on its own data
dir (the session `server` must stay at version 0), three starts: the trainer pushes a checkpointed
version; the server is SIGKILLed and started again on the same data dir: it serves that version
with the checkpoint's weights, even after the trainer's retention deleted the checkpoint folder. A
version pushed without a checkpoint cannot come back: the next start keeps its number and refuses
generation (503) until a push, and a push then serves.
Before the fix the restarted server reported (and served) version 0, the base weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.clients.servers import start_server, vllm_lock
from flywheel.server.weights.client import push_weights
from flywheel.server.weights.protocol import CHECKPOINT_NOT_VISIBLE
from flywheel.server.weights.served_record import ServedRecord, pin_checkpoint, read_record, unpin, write_record
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.train import train
from tests.test_push_retry import FlakyServer, Handler
from tests.test_trainer import make_config
from tests.test_trainer_push import hf_logprobs

PROMPT = "Once upon a time"


def test_a_pin_outlives_its_checkpoint_and_the_record_is_replaced_whole(tmp_path, tiny_model):
    checkpoint = tmp_path / "checkpoints" / "step_000004"
    shutil.copytree(tiny_model, checkpoint)
    files = sorted(str(p) for p in checkpoint.glob("*.safetensors"))
    data_dir = tmp_path / "serve"
    pinned = pin_checkpoint(data_dir, 7, files)
    want = {Path(f).name: Path(f).read_bytes() for f in files}
    shutil.rmtree(checkpoint)  # the trainer's keep_checkpoints retention
    assert {p.name: p.read_bytes() for p in pinned.iterdir()} == want
    assert read_record(data_dir) is None
    write_record(data_dir, ServedRecord(version=7, kind="weights", folder=str(pinned)))
    write_record(data_dir, ServedRecord(version=8, kind="unrecoverable"))
    assert read_record(data_dir).version == 8
    assert sorted(p.name for p in (data_dir / "served").iterdir()) == ["record.json", "v7"]  # no temporary file
    unpin(data_dir, None)
    assert not pinned.exists()


def test_an_adapter_record_keeps_the_base_weights_it_was_pushed_on(tmp_path):
    from flywheel.server.weights.adapter import adapter_record

    adapter = tmp_path / "adapters" / "v3"
    assert adapter_record(tmp_path, 3, adapter, "").base is None  # on the starting checkpoint
    write_record(tmp_path, ServedRecord(version=4, kind="weights", folder="/data/served/v4"))
    record = adapter_record(tmp_path, 5, adapter, "step 5")
    assert (record.kind, record.folder, record.base) == ("adapter", str(adapter), "/data/served/v4")
    write_record(tmp_path, record)
    assert adapter_record(tmp_path, 6, adapter, "").base == "/data/served/v4"
    write_record(tmp_path, ServedRecord(version=7, kind="unrecoverable"))
    assert adapter_record(tmp_path, 8, adapter, "").kind == "unrecoverable"  # its base weights are gone


def greedy(server) -> tuple[list[int], torch.Tensor, str]:
    """8 greedy tokens: their ids, the server's logprobs of them, and the version header of the answer."""
    reply = httpx.post(
        server.base_url + "/completions",
        timeout=60,
        json={
            "model": server.model,
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0.0,
            "logprobs": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return (
        choice["token_ids"],
        torch.tensor(choice["logprobs"]["token_logprobs"]),
        reply.headers["x-flywheel-policy-version"],
    )


def status(server) -> dict:
    return httpx.get(server.url + "/flywheel/status", timeout=10).json()


def kill(server) -> None:
    """SIGKILL the server's whole process group (API server and engine core): no shutdown code runs."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(30)


def commit(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/flywheel/admin/weights/push", json=body, headers=server.admin_headers, timeout=60)


class RemoteHandler(Handler):
    """A server on another host: it cannot read the trainer's checkpoint folder, so it refuses a commit
    that names one, with the message the real server sends (server/weights/protocol.py)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.bodies.append(body)
        if body.get("checkpoint"):
            message = f"checkpoint {body['checkpoint']!r}: {CHECKPOINT_NOT_VISIBLE} (...)"
            self._json(400, {"error": {"message": message, "type": "invalid_request_error", "code": 400}})
            return
        self.server.version = body["version"]
        self._json(200, {"version": body["version"], "tensors": 1, "bytes": 8, "seconds": {"total": 0.0}})


def test_the_trainer_names_its_checkpoint_and_pushes_without_it_to_a_server_that_cannot_read_it(tmp_path, tiny_model):
    server = FlakyServer([])
    server.RequestHandlerClass, server.bodies = RemoteHandler, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    config = make_config(
        tmp_path,
        tiny_model,
        objective="sft",
        data=[str(data)],
        batch_size=1,
        max_steps=2,
        push_every=1,
        push_url=f"http://127.0.0.1:{server.server_port}",
        admin_token="t",
    )
    try:
        assert train(config).pushed_version == 2
    finally:
        server.shutdown()
    named = [(b["version"], b.get("checkpoint")) for b in server.bodies]
    # the first push names step 1's checkpoint (absolute), is refused, goes again without; later ones skip it
    assert named == [(1, str((config.run_dir / "checkpoints" / "step_000001").resolve())), (1, None), (2, None)]


@pytest.mark.slow  # three vLLM starts (~1 min each on CPU, plus waiting for the one-server lock)
@pytest.mark.timeout(2400)  # the wait for the lock comes first
def test_restarted_server_serves_the_last_pushed_version(tmp_path, tiny_model):
    with vllm_lock():  # held across the restarts: no other test's server starts in between
        restart_twice(tmp_path, tiny_model)


def restart_twice(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "the end " * 4}]}
            )
            + "\n"
            for i in range(4)
        )
    )
    serve_dir = Path(tempfile.mkdtemp(prefix="fwrest", dir="/tmp"))  # ZMQ socket paths must stay short
    try:
        with start_server(tiny_model, serve_dir) as server:
            config = TrainConfig(
                objective="sft",
                model=str(tiny_model),
                data=[str(data)],
                run_dir=tmp_path / "run",
                max_seq_len=64,
                micro_batch_tokens=128,
                batch_size=4,
                lr=5e-3,
                max_steps=4,
                save_every=0,
                push_every=4,
                push_url=server.base_url,
                admin_token=server.admin_token,
            )
            assert train(config).pushed_version == 1
            assert status(server)["policy_version"] == 1
            ids, before, _ = greedy(server)
            kill(server)

        ckpt = config.run_dir / "checkpoints" / "step_000004"
        prompt_ids = AutoTokenizer.from_pretrained(ckpt)(PROMPT)["input_ids"]
        want = hf_logprobs(ckpt, prompt_ids, ids)
        torch.testing.assert_close(before, want, atol=0.01, rtol=0)  # what version 1 served
        base_logprobs = hf_logprobs(tiny_model, prompt_ids, ids)
        assert (want - base_logprobs).abs().max() > 0.05  # the checkpoint is not the base
        shutil.rmtree(ckpt)  # the trainer's retention may delete it: the server pinned its own files

        with start_server(tiny_model, serve_dir) as server:
            s = status(server)
            assert s["policy_version"] == 1 and s["not_serving"] is None, s
            assert s["updates"][-1]["transport"] == "restore"
            models = httpx.get(server.base_url + "/models", timeout=10)
            assert models.headers["x-flywheel-policy-version"] == "1"
            ids_after, after, header = greedy(server)
            assert header == "1" and ids_after == ids
            torch.testing.assert_close(after, want, atol=0.01, rtol=0)
            assert (after - base_logprobs).abs().max() > 0.05

            # a checkpoint path the server could not restore from is refused at the edge, nothing applied
            shard = str(next(Path(tiny_model).glob("*.safetensors")))
            body = {"version": 5, "transport": "shm", "buckets": [{"path": shard}]}
            for bad in ("relative/step_000002", str(tmp_path / "missing"), str(tmp_path)):
                r = commit(server, {**body, "checkpoint": bad})
                assert r.status_code in (400, 422), (bad, r.text)  # vLLM answers validation errors with 400
                assert "checkpoint" in r.json()["error"]["message"], r.text
            assert status(server)["policy_version"] == 1

            # a push that names no checkpoint: served now, not recoverable after a restart
            weights = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
            push_weights(server.url, weights, version=2, admin_token=server.admin_token, transport="shm")
            assert greedy(server)[2] == "2"
            kill(server)

        with start_server(tiny_model, serve_dir) as server:
            s = status(server)
            assert s["policy_version"] == 2 and "without a `checkpoint`" in s["not_serving"], s
            refused = httpx.post(
                server.base_url + "/completions",
                json={"model": server.model, "prompt": PROMPT, "max_tokens": 2},
                timeout=30,
            )
            assert refused.status_code == 503 and "version 2" in refused.json()["error"]["message"]
            push_weights(server.url, weights, version=3, admin_token=server.admin_token, transport="shm")
            assert status(server)["not_serving"] is None and greedy(server)[2] == "3"
    finally:
        shutil.rmtree(serve_dir, ignore_errors=True)
