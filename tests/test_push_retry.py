"""The trainer's push survives a server that restarts or stalls mid-push (issue 16, defect 4): it retries
with backoff, reports the failures, and goes on; a refused push (4xx) still raises. A small HTTP server
plays the Flywheel server's two routes the pusher uses."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flywheel.server.weights.client import PushFailed
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.push import WeightPusher


class FlakyServer(ThreadingHTTPServer):
    def __init__(self, script: list):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.version, self.commits = list(script), 0, 0  # one answer per commit: int status or "reset"
        self.run_dir, self.on_disk = None, []  # the trainer's checkpoints when each commit arrived


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._json(
            200,
            {
                "model": "m",
                "served_model_name": "m",
                "policy_version": self.server.version,
                "started_at": 0.0,
                "uptime_s": 1.0,
            },
        )

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.commits += 1
        if self.server.run_dir is not None:
            states = sorted((self.server.run_dir / "checkpoints").glob("step_*/trainer_state/state.json"))
            self.server.on_disk.append(
                (body["version"], {p.parts[-3]: json.loads(p.read_text())["pushed_version"] for p in states})
            )
        answer = self.server.script.pop(0) if self.server.script else 200
        if answer == "reset":  # the server died mid-push: no answer at all
            self.connection.shutdown(2)
            return
        if answer != 200:
            self._json(answer, {"error": {"message": f"scripted {answer}", "type": "x", "param": None, "code": answer}})
            return
        self.server.version = body["version"]
        self._json(200, {"version": body["version"], "tensors": 1, "bytes": 8, "seconds": {"total": 0.0}})


class Policy:
    def state_dict_hf(self):
        return {"w": torch.zeros(2)}


@pytest.fixture
def flaky(request):
    server = FlakyServer(request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def pusher(server, retries=3) -> WeightPusher:
    config = TrainConfig(
        data=["x.jsonl"],
        model="m",
        push_url=f"http://127.0.0.1:{server.server_port}",
        push_every=1,
        admin_token="t",
        push_retries=retries,
        push_backoff_s=0.01,
    )
    return WeightPusher(config)


@pytest.mark.parametrize("flaky", [["reset", 503]], indirect=True)
def test_a_push_that_fails_on_the_way_is_retried(flaky):
    p = pusher(flaky)
    metrics = p.push(Policy(), p.next_version(0), step=1)
    assert metrics["pushed_version"] == 1 and metrics["push_failures"] == 2 and flaky.commits == 3
    assert flaky.version == 1
    p.close()


@pytest.mark.parametrize("flaky", [[503, 503, 503, 503, 503]], indirect=True)
def test_a_push_that_keeps_failing_is_reported_and_the_run_goes_on(flaky):
    p = pusher(flaky, retries=2)
    metrics = p.push(Policy(), p.next_version(0), step=1)
    assert metrics["push_failures"] == 3 and metrics["push_failed_version"] == 1 and "pushed_version" not in metrics
    assert flaky.version == 0 and flaky.commits == 3
    p.close()


@pytest.mark.parametrize("flaky", [[400]], indirect=True)
def test_a_refused_push_still_raises(flaky):
    p = pusher(flaky)
    with pytest.raises(PushFailed) as info:
        p.push(Policy(), p.next_version(0), step=1)
    assert info.value.status == 400 and flaky.commits == 1
    p.close()


@pytest.mark.parametrize("flaky", [[]], indirect=True)
def test_a_version_is_durable_before_it_is_pushed(flaky, tmp_path, tiny_model):
    """Issue 16 defect 3: the trainer pushed before it checkpointed, so a kill mid-push left the server
    serving a version no checkpoint held. Each push now finds its step's checkpoint, holding its version."""
    from flywheel.trainer.train import train

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
    flaky.run_dir = tmp_path / "run"
    config = TrainConfig(
        objective="sft",
        model=str(tiny_model),
        data=[str(data)],
        run_dir=flaky.run_dir,
        max_seq_len=64,
        micro_batch_tokens=128,
        batch_size=4,
        lr=5e-3,
        max_steps=4,
        save_every=0,
        keep_checkpoints=10,
        push_every=2,
        push_url=f"http://127.0.0.1:{flaky.server_port}",
        admin_token="t",
    )
    state = train(config)
    assert state.pushed_version == 2
    assert [(v, on_disk.get(f"step_{2 * v:06d}")) for v, on_disk in flaky.on_disk] == [(1, 1), (2, 2)]
