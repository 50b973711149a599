"""Production prompts -> GRPO in `flywheel up` (--production-prompts): end to end on CPU, and the mixing source.

The loop runs with production_prompts=only: every prompt the sampler takes is one an OpenAI SDK user
sent to the loop's own server (captured into the loop's Redis), scored by a judge endpoint (a tiny
HTTP reward server here: the share of completion tokens equal to tiny_reward.TARGET, which the tiny
Qwen3 has signal on from the first step) or, when the request's metadata names an answer, by the
verifier. The loop trains on them and the version advances. A request sent with the capture opted
out (header x-flywheel-capture: off) is nowhere in Redis: not in any key at the end, and not in
Redis's append-only file, which holds every write ever made (trimmed or deleted ones too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from flywheel.clients.servers import vllm_lock
from flywheel.clients.tiny_reward import PROMPT_TEXT, TARGET
from flywheel.sampler.config import PromptSourceConfig, QueueConfig
from flywheel.sampler.prompts import PromptItem, iter_prompts
from flywheel.sampler.queue import PromptQueue
from flywheel.server.capture import CapturedRequest

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, GROUP = 2, 16, 8
SECRET = "optedoutsecret"  # in the opted-out user's prompt only


class _JudgeServer(BaseHTTPRequestHandler):
    """A remote-judge reward (the `http` scorer's protocol): {"value": score(completion token ids)}."""

    calls = 0

    @staticmethod
    def score(ids: list[int]) -> float:
        raise NotImplementedError

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).calls += 1
        out = json.dumps({"value": self.score(body["context"].get("completion_token_ids") or [])}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


class _Judge(_JudgeServer):
    """The remote-judge reward: share of completion tokens equal to TARGET."""

    calls = 0

    @staticmethod
    def score(ids: list[int]) -> float:
        return sum(t == TARGET for t in ids) / max(1, len(ids))


class Users(threading.Thread):
    """OpenAI SDK users of the running loop: production-style prompts until stopped; one of them
    asks with a reference answer in the request metadata (a known task: the verifier scores it)."""

    def __init__(self, base_url: str, model: str):
        super().__init__(daemon=True)
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
        self.model, self.stop, self.sent, self.errors = model, threading.Event(), 0, []

    def run(self):
        i = 0
        while not self.stop.is_set():
            try:
                extra = {"metadata": {"answer": "7", "task": "chain_sum"}} if i == 1 else None
                self.client.completions.create(
                    model=self.model, prompt=f" ticket{i}" + PROMPT_TEXT, max_tokens=8, extra_body=extra
                )
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - recorded, asserted on below
                if not self.stop.is_set():  # once stopped, the loop is shutting its server down
                    self.errors.append(repr(exc))
            i += 1
            time.sleep(0.5)


def redis_dump(client) -> bytes:
    """Every value of every key (streams entry by entry), concatenated: what Redis holds now."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "stream":
            out += [v for _, fields in client.xrange(key) for v in fields.values()]
        elif kind == "string":
            out.append(client.get(key) or b"")
        elif kind == "hash":
            out += [k + v for k, v in client.hgetall(key).items()]
        elif kind == "set":
            out += list(client.smembers(key))
        elif kind == "list":
            out += client.lrange(key, 0, -1)
        out.append(key)
    return b"\n".join(out)


def test_production_prompts_are_captured_sampled_scored_trained_and_opt_out_never_stored(tmp_path, tiny_model):
    import httpx
    import redis

    judge = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    run_dir, log = tmp_path / "run", tmp_path / "up.log"
    config = {
        "run_dir": str(run_dir),
        "model": str(tiny_model),
        "production_prompts": "only",
        "production_rewards": [{"name": "http", "options": {"url": f"http://127.0.0.1:{judge.server_address[1]}/"}}],
        "max_steps": STEPS,
        "push_every": 1,
        "max_staleness": 2,
        "group_size": GROUP,
        "batch_size": BATCH,
        "lr": 6e-3,
        "max_tokens": 8,
        "sampler_concurrency": 2,
        "eval": False,
        "refresh_s": 1.0,
        "live": False,
        "serve": {"max_model_len": 256, "max_num_seqs": 32, "kv_cache_gib": 1},
        "train": {"max_seq_len": 64, "micro_batch_tokens": 512, "min_lr_ratio": 1.0},
    }
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump(config))
    # the caller's PYTHONPATH first: where `flywheel` resolves for this test must be where it does for the loop
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    users = None
    try:
        with vllm_lock(), open(log, "a") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel.clients.cli", "up", "--config", str(tmp_path / "loop.yaml")],
                cwd=REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            deadline = time.time() + 600
            while not (run_dir / "config" / "serve.yaml").is_file():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
            serve = yaml.safe_load((run_dir / "config" / "serve.yaml").read_text())
            url = f"http://127.0.0.1:{serve['port']}"
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
                time.sleep(1)
            from openai import OpenAI

            # capture off for this user's request: nothing of it may reach Redis
            secret = OpenAI(base_url=url + "/v1", api_key="none").completions.create(
                model=Path(tiny_model).name,
                prompt=f" {SECRET}" + PROMPT_TEXT,
                max_tokens=8,
                extra_headers={"x-flywheel-capture": "off"},
            )
            assert secret.choices
            users = Users(url + "/v1", Path(tiny_model).name)
            users.start()
            r = redis.Redis.from_url(yaml.safe_load((run_dir / "config" / "sample.yaml").read_text())["queue"]["url"])
            held = b""
            while proc.poll() is None:
                metrics = run_dir / "train" / "metrics.jsonl"
                if metrics.is_file() and f'"step": {STEPS}' in metrics.read_text():
                    users.stop.set()  # the last step is done: the loop stops its server soon
                try:
                    held = redis_dump(r)  # the last look before the loop stops its Redis
                except redis.RedisError:
                    break
                assert time.time() < deadline + 300, log.read_text()[-4000:]
                time.sleep(0.5)
            assert proc.wait(60) == 0, log.read_text()[-4000:]
    finally:
        if users is not None:
            users.stop.set()
        if "proc" in locals() and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        judge.shutdown()
    assert users.sent >= 4 and not users.errors, users.errors[:3]
    final = json.loads((run_dir / "up" / "final.json").read_text())
    from flywheel.clients.report import loop_summary

    summary = loop_summary(run_dir)
    print({k: v for k, v in summary.items() if k.startswith("production")}, "sent", users.sent)
    # the version advanced once per step, on production prompts only
    assert final["policy_version"] == STEPS
    assert summary["production_captured"] >= summary["production_sampled"] >= summary["production_scored"] >= 2
    # the users' requests only: not the opted-out one, nor the sampler's own (which opt out themselves)
    assert summary["production_captured"] <= users.sent
    assert summary["production_scored_judge"] >= 2 and _Judge.calls >= 2 * GROUP
    assert summary["production_scored_verifier"] == 1  # the request that named its answer
    assert summary["production_trained"] == STEPS * BATCH  # every trained completion was a production prompt's
    assert summary["production_kept_rollouts"] >= STEPS * BATCH
    rollouts = [json.loads(line) for line in (run_dir / "sampler" / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and all(r["group_id"].startswith("capture:") and "ticket" in r["prompt"] for r in rollouts)
    # the opted-out request: in no key at the end, and never written (the AOF holds every write)
    aof = b"".join(p.read_bytes() for p in (run_dir / "redis").rglob("*.aof*") if p.is_file())
    assert b"ticket0" in aof and b"ticket0" in held  # the check can see a captured prompt
    assert SECRET.encode() not in aof and SECRET.encode() not in held
    report = (run_dir / "report.html").read_text()
    assert "production_trained" in report


def test_mixed_source_interleaves_captured_prompts_and_never_waits_for_them(redis_client, redis_url, tmp_path):
    prompts = tmp_path / "task.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"task {i}"}) + "\n" for i in range(6)))
    queue = QueueConfig(url=redis_url)
    captures = PromptQueue(queue, stream="prompts")
    for i in range(2):
        captures.put(CapturedRequest(endpoint="completions", prompt=f"user {i}", sampling={"max_tokens": 4}))
    captures.put(CapturedRequest(endpoint="chat", messages=[{"role": "user", "content": "q"}], status=500))
    captures.put(
        CapturedRequest(endpoint="completions", prompt="user 2", sampling={"metadata": {"answer": "5", "task": "t"}})
    )
    config = PromptSourceConfig(kind="jsonl", path=prompts, num_prompts=None, production_fraction=0.5)
    items: list[PromptItem] = []
    for item in iter_prompts(config, queue):
        items.append(item)
        if item.done:
            item.done()
    got = [i.prompt for i in items]
    # half of the first prompts are captured (the failed request skipped), then the task's go on alone
    assert got == ["user 0", "task 0", "user 1", "task 1", "user 2", "task 2", "task 3", "task 4", "task 5"], got
    production = [i for i in items if i.production]
    assert all(i.id.startswith("capture:") for i in production)
    assert production[-1].answer == "5" and production[-1].task == "t" and production[0].answer is None
    assert captures.stats()["pending"] == 0  # each one acked once used


@pytest.mark.parametrize("mode", ["only", "mix"])
def test_loop_config_points_capture_and_sampler_at_the_loop_redis(tmp_path, mode):
    from flywheel.clients.loop_configs import LoopConfig, component_configs

    config = LoopConfig(run_dir=tmp_path, production_prompts=mode, production_fraction=0.25, eval=False)
    out = component_configs(config, tmp_path, "redis://127.0.0.1:7777/0", 8000)
    assert out["serve"].capture_redis_url == out["sample"].queue.url == "redis://127.0.0.1:7777/0"
    assert out["sample"].prompts.capture_stream == out["serve"].capture_stream
    assert out["sample"].prompts.kind == ("capture" if mode == "only" else "gym")
    assert out["sample"].prompts.production_fraction == (0.25 if mode == "mix" else 0.0)
    off = component_configs(LoopConfig(run_dir=tmp_path, eval=False), tmp_path, "redis://127.0.0.1:7777/0", 8000)
    assert off["serve"].capture_redis_url is None and off["sample"].prompts.production_fraction == 0


class _LengthJudge(_JudgeServer):
    """A judge with signal on the fake endpoint's answers: the number of completion tokens."""

    calls = 0

    @staticmethod
    def score(ids: list[int]) -> float:
        return float(len(ids))


def test_each_prompt_is_scored_by_its_own_reward_and_counted(redis_client, redis_url, tmp_path):
    """A mixed run against a fake OpenAI endpoint: task prompts by the task's reward, a captured one
    naming its answer by the verifier, the other captured ones by the judge; counted in the stats."""
    import asyncio

    from flywheel.sampler.config import GrpoSampleConfig
    from flywheel.sampler.grpo import sample_grpo
    from flywheel.sampler.queue import RolloutQueue
    from flywheel.sampler.record import RolloutRecord
    from flywheel.sampler.rewards import RewardSpec
    from tests.test_sampler_kill import FakeOpenAI

    fake = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    judge = ThreadingHTTPServer(("127.0.0.1", 0), _LengthJudge)
    for server in (fake, judge):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeOpenAI.delay_s, _LengthJudge.calls = 0.0, 0
    captures = PromptQueue(QueueConfig(url=redis_url), stream="prompts")
    for text, metadata in [("hello", None), ("what is 0?", {"answer": "0"}), ("hi there", None)]:
        sampling = {"metadata": metadata} if metadata else {}
        captures.put(CapturedRequest(endpoint="chat", messages=[{"role": "user", "content": text}], sampling=sampling))
    config = GrpoSampleConfig(
        endpoint={"base_url": f"http://127.0.0.1:{fake.server_address[1]}/v1", "model": "fake"},
        prompts=PromptSourceConfig(kind="gym", num_prompts=4, production_fraction=0.5),
        sampling={"n": 3, "max_tokens": 8},
        rewards=[RewardSpec(name="length_penalty", options={"target": 1, "limit": 8})],
        production_rewards=[RewardSpec(name="http", options={"url": f"http://127.0.0.1:{judge.server_address[1]}/"})],
        queue=QueueConfig(url=redis_url),
        drop_uniform_groups=False,
        concurrency=1,
        progress=False,
    )
    try:
        asyncio.run(sample_grpo(config))
    finally:
        fake.shutdown()
        judge.shutdown()
    stats = RolloutQueue(config.queue).stats()
    assert stats["production_sampled"] == stats["production_scored"] == 3
    assert (stats["production_scored_verifier"], stats["production_scored_judge"]) == (1, 2)
    assert stats["production_kept_rollouts"] == 9 and _LengthJudge.calls == 6
    records = [RolloutRecord.from_bytes(f[b"r"]) for _, f in redis_client.xrange("rollouts")]
    reward_of = {}
    for r in records:
        content = r.messages[-1]["content"]
        reward_of.setdefault(content if r.group_id.startswith("capture:") else "task", set()).add(r.rewards[0].name)
    assert reward_of == {
        "hello": {"http"},
        "hi there": {"http"},
        "what is 0?": {"math_verify"},
        "task": {"length_penalty"},
    }
    assert captures.stats()["pending"] == 0 and captures.stats()["acked"] == 3  # each capture's done mark: its ack
