"""Fault injection for `flywheel up` (issue 16 item 14): SIGKILL a component at a chosen moment, then check
that nothing was lost, nothing trained twice, and every served version is a checkpoint's weights.

Used by tests/test_faults.py (a few scheduled kills, in CI) and bench/chaos.py (>= 20 random ones).

    run = FaultRun(run_dir, fault_loop_config(run_dir, model, prompts))
    run.start()                      # `flywheel up` in its own process group, until the server answers
    run.kill("trainer_batch_wait")   # waits for the moment, SIGKILLs the component's process group
    run.recover(kill)                # until `flywheel up` restarted it and the trainer made a new step
    run.stop()                       # SIGTERM (a clean stop: exit 130), what Ctrl-C does
    report = check_run(run_dir, model, run.fingerprints)

How each moment is found (from what the components publish, nothing inside them):

    trainer_mid_step     the trainer's process group burns CPU (> MIN_BUSY cores over 0.3 s) after it has
                         logged a step since its start, and the queue holds records delivered to it
    trainer_batch_wait   the sampler's group is SIGSTOPped (no new batch can come) until the trainer has drained
                         the queue and sits idle (< MAX_IDLE cores); after a checkpoint step the sampler gets
                         SIGCONT until one more step is logged, and is stopped again; once idle after a
                         non-checkpoint step for longer than the queue's claim_idle_s (defect 1: its own
                         reclaim finds the step's records), SIGKILL; then SIGCONT to the sampler.
    trainer_mid_push     polled every 10 ms: run_dir/train/checkpoints/latest names a new checkpoint whose
    server_mid_push      pushed_version the server does not serve yet (the trainer checkpoints, acks, then
                         pushes: it is in the ack or the push); `hit`: the server still served the older
                         version right after a trainer kill; the trainer logged that push's failure after a
                         server kill
    sampler_mid_batch    the server runs requests (vllm:num_requests_running > 0): the sampler's groups
    redis                any time; `flywheel up` restarts it on the same port from its AOF

Fingerprint: the greedy logprobs of a fixed prompt, served, with the one version the answer says
served it (`policy_versions`); `check_run` compares each with the same tokens' logprobs under that
version's checkpoint loaded by transformers in fp32 (version 0: the starting model).

Accounting (`check_run`): after the run, a copy of the run's Redis AOF is loaded in a fresh redis-server
and every rollout produced (run_dir/sampler/rollouts.jsonl and the stream) is classified by record id:
consumed by the trainer (in the last checkpoint's trained ids: trained, or dropped as stale),
dead-lettered, pending (delivered, in no checkpoint yet), queued (never delivered), or lost (none of
these: acked without being in a checkpoint). produced = trained + dropped_stale + pending + queued +
dead_lettered + lost, and trained_twice counts ids twice in the checkpoint's trained ids.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from flywheel.clients import process_group
from flywheel.clients.tiny_reward import PROMPT_TEXT
from flywheel.server.net import free_port
from flywheel.trainer.checkpoint import read_train_state

KINDS = (
    "trainer_mid_step",
    "trainer_batch_wait",
    "trainer_mid_push",
    "sampler_mid_batch",
    "server_mid_push",
    "redis",
)
COMPONENT = {kind: kind.split("_")[0] for kind in KINDS}
MIN_BUSY, MAX_IDLE = 0.3, 0.1  # cores: a process computing a step / one blocked on a read
# a reward with signal in every group, whatever the policy learns: with the learnable target-token reward
# (clients/tiny_reward.py SCORER) the policy reached 0.97 by step 50, nearly every group came out uniform
# and was dropped, and the trainer starved
LOW_ID_SCORER = "flywheel.clients.tiny_reward:low_id_fraction"
FINGERPRINT_PROMPT = "The quick brown fox"
FINGERPRINT_TOKENS = 4
LOGPROB_ATOL = 0.01  # served (vLLM on CPU, fp32) vs transformers fp32, as tests/test_trainer_push.py


def fault_loop_config(run_dir: Path, model: str | Path, prompts: Path, **extra: Any) -> dict[str, Any]:
    """A small `flywheel up` config for fault runs on tiny-qwen3: small server, no eval, save/push every 2
    steps (odd steps are non-checkpoint steps), every checkpoint kept (each served version is checked against
    its own), fast reclaim of a killed trainer's records, generous restarts."""
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": PROMPT_TEXT}) + "\n" for i in range(100_000)))
    config = {
        "run_dir": str(run_dir),
        "model": str(model),
        "max_steps": 1000,
        "push_every": 2,
        "max_staleness": 2,
        "group_size": 4,
        "batch_size": 16,
        # 3 batches, not the default 4: the batch-wait kill stops the sampler with a full backlog and needs
        # the trainer to drain it to a non-checkpoint (odd) step; 4 batches from an even step always end
        # on an even one (with a reward that drops no groups, the moment never came: the test timed out)
        "max_backlog": 48,
        "lr": 3e-3,
        "max_tokens": 8,
        "rewards": [{"name": LOW_ID_SCORER}],
        "sampler_concurrency": 2,
        "eval": False,
        "report": False,
        "refresh_s": 1.0,
        "live": False,
        "restarts": 100,
        "restart_backoff_s": 0.5,
        "serve": {"max_model_len": 256, "max_num_seqs": 16, "kv_cache_gib": 1},
        "sample": {"prompts": {"kind": "jsonl", "path": str(prompts), "num_prompts": None}},
        "train": {
            "max_seq_len": 64,
            "micro_batch_tokens": 512,
            "min_lr_ratio": 1.0,
            "keep_checkpoints": 1000,
            "queue": {"claim_idle_s": 4},
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class Kill:
    kind: str
    at: float  # unix time of the SIGKILL
    step: int  # the trainer's last logged step then
    hit: bool  # the moment was the one asked for (see the module docstring)
    detail: str = ""
    version: int | None = None  # mid-push kills: the version being pushed
    recovered_s: float | None = None


@dataclass
class Fingerprint:
    version: int
    token_ids: list[int]
    logprobs: list[float]
    at: float = field(default_factory=time.time)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live members of a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for m in process_group.members(pgid):
        try:
            raw = Path(f"/proc/{m.pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


class FaultRun:
    """One `flywheel up` process and what is needed to kill its children at chosen moments."""

    def __init__(self, run_dir: Path, config: dict[str, Any], log: Path | None = None):
        self.run_dir = Path(run_dir)
        self.config = config
        self.log = log or self.run_dir.parent / f"{self.run_dir.name}-up.log"
        self.proc: subprocess.Popen | None = None
        self.kills: list[Kill] = []
        self.fingerprints: list[Fingerprint] = []
        self.http = httpx.Client(timeout=30)
        self.server_url = ""
        self.model_name = Path(str(config["model"])).name
        self.batch = int(config["batch_size"])
        self.save_every = int(config.get("push_every", 2))
        self.claim_idle_s = float(config["train"]["queue"]["claim_idle_s"])
        self._queue = None
        self.restart_base: dict[str, int] = {}  # restarts already in run_dir/up/restarts.jsonl (a resumed run)

    # ------------------------------------------------------------ process
    def start(self, timeout_s: float = 900) -> None:
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.restart_base = {name: self.restarts(name) for name in set(COMPONENT.values())}
        # a fixed server port: the fingerprints and the status polls find a restarted server where it was
        self.config.setdefault("serve", {}).setdefault("port", free_port())
        path = self.run_dir.parent / f"{self.run_dir.name}-loop.yaml"
        path.write_text(yaml.safe_dump(self.config))
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel.clients.cli", "up", "--config", str(path)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.server_url = f"http://127.0.0.1:{self.config['serve']['port']}"
        self.wait(lambda: self.trainer_step() >= 1, timeout_s, "the first trainer step")

    def alive_check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"flywheel up exited ({self.proc.returncode}):\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.is_file() else ""

    def wait(self, predicate, timeout_s: float, what: str, poll_s: float = 0.5):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            self.alive_check()
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 300) -> int:
        """SIGTERM to `flywheel up` (what Ctrl-C does): it stops every child and keeps the state."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        """Whatever happened: nothing of this run keeps running."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._queue is not None:
            self._queue.close()
        self.http.close()

    # ------------------------------------------------------------ what the loop publishes
    def pids(self) -> dict[str, int]:
        path = self.run_dir / "up" / "pids.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}  # being rewritten

    def restarts(self, name: str) -> int:
        path = self.run_dir / "up" / "restarts.jsonl"
        if not path.is_file():
            return 0
        return sum(1 for line in path.read_text().splitlines() if line.strip() and json.loads(line)["name"] == name)

    def metrics_rows(self) -> list[dict]:
        path = self.run_dir / "train" / "metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # being written
        return rows

    def trainer_step(self) -> int:
        rows = self.metrics_rows()
        return rows[-1]["step"] if rows else 0

    def latest_checkpoint(self) -> tuple[str, int] | None:
        """(folder name, pushed_version) of run_dir/train/checkpoints/latest."""
        root = self.run_dir / "train" / "checkpoints"
        try:
            name = (root / "latest").read_text().strip()
            return name, read_train_state(root / name).pushed_version
        except (OSError, ValueError):
            return None

    def served_version(self) -> int | None:
        try:
            return self.http.get(self.server_url + "/flywheel/status", timeout=3).json()["policy_version"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def running_requests(self) -> float:
        from flywheel.clients.loop_status import prometheus_values

        try:
            text = self.http.get(self.server_url + "/metrics", timeout=3).text
        except httpx.HTTPError:
            return 0.0
        return prometheus_values(text, ("vllm:num_requests_running",))["vllm:num_requests_running"]

    def queue_stats(self) -> dict[str, Any] | None:
        if self._queue is None:
            from flywheel.sampler.config import QueueConfig
            from flywheel.sampler.queue import RolloutQueue

            train = yaml.safe_load((self.run_dir / "config" / "train.yaml").read_text())
            self._queue = RolloutQueue(QueueConfig(**{**train["queue"], "retry_for_s": 1.0}), consumer="faults-probe")
        try:
            return self._queue.stats()
        except Exception:  # Redis down (being restarted)
            return None

    def busy(self, pgid: int, over_s: float = 0.3) -> float:
        """Cores the group used over the next `over_s` seconds."""
        before = group_cpu_s(pgid)
        time.sleep(over_s)
        return (group_cpu_s(pgid) - before) / over_s

    def fingerprint(self) -> Fingerprint | None:
        """Greedy logprobs of the fixed prompt and the one version that served them (None: no clean answer)."""
        try:
            reply = self.http.post(
                self.server_url + "/v1/completions",
                json={
                    "model": self.model_name,
                    "prompt": FINGERPRINT_PROMPT,
                    "max_tokens": FINGERPRINT_TOKENS,
                    "temperature": 0.0,
                    "logprobs": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            body = reply.json()
            versions = body.get("policy_versions") or []
            choice = body["choices"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            return None
        if reply.status_code != 200 or len(versions) != 1:
            return None  # a push landed during the answer: which weights made which token is not known
        fp = Fingerprint(versions[0], choice["token_ids"], choice["logprobs"]["token_logprobs"])
        self.fingerprints.append(fp)
        return fp

    # ------------------------------------------------------------ kills
    def _sigkill(self, name: str) -> int:
        for _ in range(50):  # pids.json may be being rewritten (a child was just restarted)
            if pgid := self.pids().get(name):
                os.killpg(pgid, signal.SIGKILL)
                return pgid
            time.sleep(0.1)
        raise AssertionError(f"no {name} in {self.run_dir / 'up' / 'pids.json'}")

    def kill(self, kind: str, timeout_s: float = 300) -> Kill:
        """Wait for the moment `kind` names, SIGKILL that component's process group, return what was done."""
        assert kind in KINDS, kind
        deadline = time.time() + timeout_s
        while True:
            self.alive_check()
            if time.time() > deadline:
                raise AssertionError(f"no moment for {kind} within {timeout_s:.0f} s:\n{self.log_tail()}")
            done = getattr(self, "_" + kind)(deadline)
            if done is not None:
                self.kills.append(done)
                return done

    def _trainer_mid_step(self, deadline: float) -> Kill | None:
        start_rows = len(self.metrics_rows())
        self.wait(lambda: len(self.metrics_rows()) > start_rows, deadline - time.time(), "a trainer step", 0.1)
        while time.time() < deadline:
            pgid = self.pids().get("trainer")
            stats = self.queue_stats()
            if pgid and stats and stats["pending"] >= self.batch and self.busy(pgid) > MIN_BUSY:
                step = self.trainer_step()
                self._sigkill("trainer")
                return Kill("trainer_mid_step", time.time(), step, True, f"pending {stats['pending']}")
        return None

    def _idle(self, step: int, for_s: float, deadline: float) -> bool:
        """The trainer stays at `step` and idle (< MAX_IDLE cores) for `for_s` seconds."""
        since = time.time()
        while time.time() < deadline:
            trainer = self.pids().get("trainer")
            if trainer is None or self.trainer_step() != step:
                return False
            if self.busy(trainer, 0.5) > MAX_IDLE:
                since = time.time()
            elif time.time() - since >= for_s:
                return True
        return False

    def _trainer_batch_wait(self, deadline: float) -> Kill | None:
        sampler = self.pids().get("sampler")
        if sampler is None:
            return None
        try:
            while time.time() < deadline:
                os.killpg(sampler, signal.SIGSTOP)  # no new batch can come
                step = self.trainer_step()
                if not self._idle(step, 1.0, deadline):
                    continue  # it drains what is queued first
                if step % self.save_every:  # a non-checkpoint step: its records are in flight, unacked
                    if self._idle(step, self.claim_idle_s, deadline):
                        stats = self.queue_stats() or {}
                        self._sigkill("trainer")
                        return Kill(
                            "trainer_batch_wait",
                            time.time(),
                            step,
                            True,
                            f"idle {self.claim_idle_s + 1:.0f} s after step {step}, pending {stats.get('pending')}",
                        )
                    continue
                os.killpg(sampler, signal.SIGCONT)  # a checkpoint step: let one more batch through
                self.wait(lambda: self.trainer_step() != step, deadline - time.time(), "a trainer step", 0.05)
            return None
        finally:
            try:
                os.killpg(sampler, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _mid_push(self, name: str, deadline: float) -> Kill | None:
        seen = self.latest_checkpoint()
        while time.time() < deadline:
            self.alive_check()
            now = self.latest_checkpoint()
            if now is not None and now != seen:
                served = self.served_version()
                if served is not None and now[1] > served:
                    step = self.trainer_step()
                    self._sigkill(name)
                    after = self.served_version() if name == "trainer" else None
                    hit = after is None or after < now[1]
                    return Kill(
                        f"{name}_mid_push",
                        time.time(),
                        step,
                        hit,
                        f"{now[0]} holds version {now[1]}, served {served}"
                        + (f", {after} after the kill" if after is not None else ""),
                        version=now[1],
                    )
                seen = now
            time.sleep(0.01)
        return None

    def _trainer_mid_push(self, deadline: float) -> Kill | None:
        return self._mid_push("trainer", deadline)

    def _server_mid_push(self, deadline: float) -> Kill | None:
        return self._mid_push("server", deadline)

    def _sampler_mid_batch(self, deadline: float) -> Kill | None:
        while time.time() < deadline:
            running = self.running_requests()
            if running > 0 and "sampler" in self.pids():
                step = self.trainer_step()
                self._sigkill("sampler")
                return Kill("sampler_mid_batch", time.time(), step, True, f"{running:.0f} requests running")
            time.sleep(0.05)
        return None

    def _redis(self, deadline: float) -> Kill | None:
        step = self.trainer_step()
        self._sigkill("redis")
        return Kill("redis", time.time(), step, True)

    def recover(self, kill: Kill, timeout_s: float = 600) -> None:
        """Until `flywheel up` restarted the killed component and the trainer logged a step past the kill."""
        name = COMPONENT[kill.kind]
        before = self.restart_base.get(name, 0) + sum(1 for k in self.kills if COMPONENT[k.kind] == name)
        self.wait(lambda: self.restarts(name) >= before, timeout_s, f"{name}'s restart")
        self.wait(
            lambda: any(r["step"] > kill.step for r in self.metrics_rows()[-50:]) and self.trainer_step() > kill.step,
            timeout_s,
            f"a trainer step past {kill.step} after the {kill.kind} kill",
        )
        kill.recovered_s = round(time.time() - kill.at, 1)
        if kill.kind == "server_mid_push":  # hit: the trainer's push of that version failed on the way
            log = (self.run_dir / "logs" / "trainer.log").read_text(errors="replace")
            kill.hit = f"push of version {kill.version} failed" in log
        for _ in range(3):  # the version now served and its weights
            if self.fingerprint() is not None:
                break
            time.sleep(1)


# ---------------------------------------------------------------- checks after the run


def redis_on_aof(run_dir: Path):
    """The run's Redis again, on a copy of its AOF (the run's own files untouched): (process, client)."""
    import redis

    copy = Path(run_dir) / "up" / "redis-check"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(Path(run_dir) / "redis", copy)
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(copy)]
        + ["--appendonly", "yes", "--save", "", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(300):
        try:
            if client.ping():
                break
        except (redis.ConnectionError, redis.BusyLoadingError):
            time.sleep(0.1)
    return proc, client


def queue_ledger(run_dir: Path) -> dict[str, Any]:
    """Every rollout the sampler produced, classified by record id (see the module docstring).

    The produced ids are the sampler's rollouts.jsonl (it agrees with the stream after any kill: sampler/
    cursor.py) joined with the stream's entries now: the queue trims acked entries, so the stream alone no
    longer holds what was trained."""
    from flywheel.sampler.record import RolloutRecord
    from flywheel.trainer.checkpoint import latest_train_state

    run_dir = Path(run_dir)
    train = yaml.safe_load((run_dir / "config" / "train.yaml").read_text())
    stream, group = train["queue"]["stream"], train["queue"]["group"]
    found = latest_train_state(run_dir / "train")
    state = found[1] if found else None
    consumed_ids = list(state.trained_ids) if state else []
    jsonl = run_dir / "sampler" / "rollouts.jsonl"
    file_ids = [RolloutRecord.from_json(line).id for line in jsonl.read_text().splitlines() if line.strip()]
    proc, client = redis_on_aof(run_dir)
    try:
        entries = [(eid.decode(), RolloutRecord.from_bytes(f[b"r"]).id) for eid, f in client.xrange(stream)]
        dead_ids = {RolloutRecord.from_bytes(f[b"r"]).id for _, f in client.xrange(f"{stream}:dead") if f.get(b"r")}
        pending = {p["message_id"].decode() for p in client.xpending_range(stream, group, "-", "+", 10**7)}
        groups = {g["name"].decode(): g for g in client.xinfo_groups(stream)} if client.exists(stream) else {}
        last = groups[group]["last-delivered-id"].decode() if group in groups else "0-0"
        counters = {k.decode(): float(v) for k, v in client.hgetall(f"{stream}:stats").items()}
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)

    def after(a: str, b: str) -> bool:
        return tuple(map(int, a.split("-"))) > tuple(map(int, b.split("-")))

    pending_ids = {rid for eid, rid in entries if eid in pending}
    queued_ids = {rid for eid, rid in entries if eid not in pending and after(eid, last)}
    produced = list(dict.fromkeys(file_ids + [rid for _, rid in entries]))
    consumed = set(consumed_ids)
    classes = {"consumed": 0, "dead_lettered": 0, "pending": 0, "queued": 0, "lost": 0}
    lost_ids = []
    for rid in produced:
        if rid in consumed:
            classes["consumed"] += 1
        elif rid in dead_ids:
            classes["dead_lettered"] += 1
        elif rid in pending_ids:
            classes["pending"] += 1
        elif rid in queued_ids:
            classes["queued"] += 1
        else:  # acked (trimmed, or still in the stream) but in no checkpoint, or never in the stream
            classes["lost"] += 1
            lost_ids.append(rid)
    dropped_stale = state.dropped_stale if state else 0
    return {
        "produced": len(produced),
        "produced_counter": int(counters.get("produced", 0)),
        "produced_twice": len(file_ids) - len(set(file_ids)),
        "trained": classes["consumed"] - dropped_stale,
        "dropped_stale": dropped_stale,
        "trained_twice": len(consumed_ids) - len(consumed),
        "trained_not_produced": len(consumed - set(produced)),
        "pending": classes["pending"],
        "queued": classes["queued"],
        "dead_lettered": classes["dead_lettered"],
        "lost": classes["lost"],
        "lost_ids": lost_ids[:20],
        "steps": state.step if state else 0,
        "last_pushed_version": state.pushed_version if state else 0,
        "redis_counters": {k: int(v) if v.is_integer() else v for k, v in counters.items()},
    }


def checkpoints_by_version(run_dir: Path) -> dict[int, list[Path]]:
    out: dict[int, list[Path]] = {}
    for folder in sorted((Path(run_dir) / "train" / "checkpoints").glob("step_*")):
        try:
            out.setdefault(read_train_state(folder).pushed_version, []).append(folder)
        except (OSError, ValueError):
            continue
    return out


def check_fingerprints(run_dir: Path, model: Path, fingerprints: list[Fingerprint]) -> dict[str, Any]:
    """Each served (version, logprobs) against that version's checkpoint in transformers fp32 (0: the model).

    A version with several checkpoints (a push step and the steps saved after it before the next push)
    matches if the one written at the push matches: the first of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model)(FINGERPRINT_PROMPT)["input_ids"]
    by_version = checkpoints_by_version(run_dir)
    cache: dict[Path, Any] = {}
    rows = []
    for fp in fingerprints:
        folder = Path(model) if fp.version == 0 else (by_version.get(fp.version) or [None])[0]
        row = {"version": fp.version, "checkpoint": folder.name if folder else None, "max_abs_diff": None}
        if folder is not None:
            if folder not in cache:
                cache[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = cache[folder](torch.tensor([prompt_ids + fp.token_ids])).logits[0]
            logp = logits[len(prompt_ids) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(fp.token_ids)[:, None])
            row["max_abs_diff"] = float((logp[:, 0] - torch.tensor(fp.logprobs)).abs().max())
        rows.append(row)
    bad = [r for r in rows if r["max_abs_diff"] is None or r["max_abs_diff"] > LOGPROB_ATOL]
    return {
        "fingerprints": len(rows),
        "versions_checked": sorted({r["version"] for r in rows}),
        "versions_without_checkpoint": sorted({r["version"] for r in rows if r["checkpoint"] is None}),
        "fingerprint_mismatches": len(bad),
        "fingerprint_max_abs_diff": max((r["max_abs_diff"] or 0.0 for r in rows), default=None),
        "fingerprint_rows": rows,
    }


def check_run(run_dir: Path, model: Path, fingerprints: list[Fingerprint]) -> dict[str, Any]:
    return queue_ledger(run_dir) | check_fingerprints(run_dir, model, fingerprints)


def kill_summary(kills: list[Kill]) -> dict[str, Any]:
    per_kind = {kind: sum(1 for k in kills if k.kind == kind) for kind in KINDS}
    return {"kills": len(kills), "kills_by_kind": per_kind, "kill_log": [asdict(k) for k in kills]}


def random_kinds(n: int, seed: int, weights: dict[str, float] | None = None) -> list[str]:
    """`n` kill kinds drawn at random (server kills cost a vLLM start each: weight them lower)."""
    rng = random.Random(seed)
    w = weights or {}
    return rng.choices(KINDS, weights=[w.get(k, 1.0) for k in KINDS], k=n)
