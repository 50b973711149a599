"""Which transport the trainer's pushes take (TrainConfig.push_transport): ipc only for GPU weights
and a server on this host that offers it; shm on this host otherwise; http for a remote server."""

from __future__ import annotations

import httpx
import torch

import flywheel.trainer.push as push
from flywheel.server.status import ServerStatus
from flywheel.trainer.config import TrainConfig


class CudaLike:
    is_cuda = True


def pusher(url: str, transport: str = "auto") -> push.WeightPusher:
    return push.WeightPusher(
        TrainConfig(model="m", data=["x.jsonl"], push_url=url, push_every=1, push_transport=transport)
    )


def offering(monkeypatch, transports):
    seen = []

    def fake_status(url, token):
        seen.append(url)
        if transports is None:
            raise httpx.ConnectError("down")
        # the real status body's shape (a SimpleNamespace here once hid that push.py read a missing field)
        return ServerStatus.model_validate(
            {
                "model": "m",
                "served_model_name": "m",
                "policy_version": 0,
                "started_at": 0.0,
                "uptime_s": 0.0,
                "weights": {"transports": transports},
            }
        )

    monkeypatch.setattr(push, "fetch_status", fake_status)
    return seen


def test_gpu_weights_go_over_ipc_when_the_local_server_offers_it(monkeypatch):
    seen = offering(monkeypatch, ["shm", "http", "ipc"])
    assert pusher("http://127.0.0.1:8000/v1").resolve_transport({"w": CudaLike()}) == "ipc"
    assert seen == ["http://127.0.0.1:8000"]


def test_cpu_weights_or_a_server_without_ipc_take_shm_locally(monkeypatch):
    offering(monkeypatch, ["shm", "http", "ipc"])
    assert pusher("http://127.0.0.1:8000").resolve_transport({"w": torch.zeros(2)}) == "shm"
    offering(monkeypatch, ["shm", "http"])
    assert pusher("http://localhost:8000").resolve_transport({"w": CudaLike()}) == "shm"
    offering(monkeypatch, None)  # status unreachable: no guess at ipc
    assert pusher("http://127.0.0.1:8000").resolve_transport({"w": CudaLike()}) == "shm"


def test_a_remote_server_gets_http_and_an_explicit_choice_wins(monkeypatch):
    seen = offering(monkeypatch, ["shm", "http", "ipc"])
    assert pusher("http://10.1.2.3:8000").resolve_transport({"w": CudaLike()}) == "http"
    assert seen == []  # IPC handles mean nothing on another host: not even asked
    assert pusher("http://127.0.0.1:8000", "http").resolve_transport({"w": CudaLike()}) == "http"
