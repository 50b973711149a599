"""`flywheel up`: the whole loop on one machine: redis, server, sampler, GRPO trainer, eval on version change.

    flywheel up                                   # SmolLM2-135M-Instruct on easy chain_sum, 30 steps
    flywheel up --config configs/loop.yaml        # every component's settings in one file
    flywheel up --model tiny-qwen3 --max-steps 8  # any bundled model or HF folder
    flywheel up --sync                            # generate, train, push, repeat (for comparison)
    flywheel up --backend megatron --train.parallel.tensor 2   # the trainer runs as 2 torchrun ranks
    flywheel report runs/loop                     # the HTML report, on demand

Every component runs as its own child process of `python -m clients.cli` (process boundaries are
package boundaries), in its own process group, logging to run_dir/logs/NAME.log. `flywheel up`
writes each child's full configuration to run_dir/config/NAME.yaml first (what ran is on disk,
and a bad setting fails before anything starts). Redis keeps the queue in an AOF under
run_dir/redis, the trainer checkpoints under run_dir/train: Ctrl-C or SIGTERM stops every child
(SIGTERM to its group, then SIGKILL) and keeps that state; running `flywheel up` on the same
run_dir again resumes (trainer --resume; the last checkpoint is pushed to the fresh server as the
version it had, so rollouts and the trainer agree on version numbers; the sampler goes on with the
same prompt sequence from its cursor in Redis: no prompt lost, repeated or skipped).

A component that exits unexpectedly (crashed, killed) is restarted in place, `restarts` times at
most per component, after `restart_backoff_s` doubled per restart (compose's `restart:` does the
same): the trainer resumes from its last checkpoint, a restarted server gets the last checkpointed
version pushed again, Redis comes back from its AOF on the same port. Each restart is a line in the
log and in run_dir/up/restarts.jsonl; past the limit the loop stops as before.

Async (default): the sampler generates with version v while the trainer trains on what is queued;
the queue's backlog bound and the trainer's max_staleness bound how off-policy a step can be.
Sync (--sync): rounds of [sampler makes exactly push_every steps of rollouts, exits] then
[trainer trains push_every steps, pushes, checkpoints, exits]: generation and training never overlap.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel

from flywheel.clients import process_group
from flywheel.clients.loop_configs import LoopConfig, component_configs, sync_sample_config, sync_train_config
from flywheel.clients.loop_status import LoopStatus, starvation_warning, status_table
from flywheel.server.errors import UserError
from flywheel.server.net import free_port
from flywheel.trainer.checkpoint import latest_train_state

Config = LoopConfig  # the `flywheel up` command's settings (clients/loop_configs.py)


# ---------------------------------------------------------------- child processes


class Child:
    """One component: `python -m clients.cli COMMAND --config FILE` in its own process group."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n")
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(self.env or {})},
            )
        return self

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def state(self) -> str:
        if self.proc is None:
            return "-"
        rc = self.proc.poll()
        return "up" if rc is None else f"exit {rc}"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the whole group (vLLM's engine, tokenizer workers...), SIGKILL what is left after
        `timeout_s`. Returns once no member of the group is left, not merely the leader (bounded: a
        process stuck in the kernel past SIGKILL + 10 s is reported, not waited for forever)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            self.proc.poll()
            if not process_group.left(pgid, leader=pgid):
                return
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass  # only zombies are left: wait_gone reaps them
            if process_group.wait_gone(pgid, wait, leader=pgid, poll_leader=self.proc.poll):
                return
        stuck = process_group.left(pgid, leader=pgid)
        print(
            f"flywheel up: {self.name}: {len(stuck)} process(es) of group {pgid} still there after SIGKILL: "
            f"{[(m.pid, m.state) for m in stuck]}",
            file=sys.stderr,
            flush=True,
        )

    def log_tail(self, n: int = 15) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.is_file() else []
        return "\n".join(lines[-n:])


def cli_child(
    name: str, command: list[str], config_file: Path, run_dir: Path, env: dict[str, str] | None = None
) -> Child:
    argv = [sys.executable, "-m", "flywheel.clients.cli", *command, "--config", str(config_file)]
    return Child(name, argv, run_dir / "logs" / f"{name}.log", env)


def trainer_child(config: LoopConfig, config_file: Path, run_dir: Path, env: dict[str, str]) -> Child:
    """`flywheel train` as one process, or under torchrun when the trainer needs several ranks
    (megatron TP/PP/EP/DP): torchrun starts the ranks and forwards SIGTERM to them; the whole
    group is stopped as one child."""
    ranks = config.trainer_world_size()
    if ranks == 1:
        return cli_child("trainer", ["train"], config_file, run_dir, env)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # a static rendezvous on a free loopback port (with --standalone, rank 0's process group tried to
        # listen on the agent's own store port: EADDRINUSE)
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--nproc_per_node",
        str(ranks),
        "-m",
        "flywheel.clients.cli",
        "train",
        "--config",
        str(config_file),
    ]
    return Child("trainer", argv, run_dir / "logs" / "trainer.log", env)


RAN_WELL_S = 60.0  # a child that ran this long before it died restarts after the first delay again


class Stop(BaseException):
    """SIGTERM (or SIGINT) arrived: stop the children, keep the state.

    A BaseException, as KeyboardInterrupt is: raised wherever the main thread is, it must not be
    swallowed by an `except Exception` there (LoopStatus turns a failed read into missing values: a
    SIGTERM that arrived during its Redis read was taken for a Redis error and the loop went on)."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


# ---------------------------------------------------------------- the loop


class Loop:
    """Owns the run directory, the component configs and the children, from start to clean stop."""

    def __init__(self, config: LoopConfig):
        self.config = config
        self.run_dir = config.run_dir.resolve()
        for sub in ("config", "logs", "up", "redis", "eval"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.state_path = self.run_dir / "up" / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"launches": 0}
        self.state["launches"] += 1
        self.admin_token = self.state.setdefault("admin_token", secrets.token_urlsafe(18))
        self.redis_url = config.redis_url or f"redis://127.0.0.1:{free_port()}/0"
        self.server_port = (
            config.serve.port if "port" in config.serve.model_fields_set and config.serve.port else free_port()
        )
        self.server_url = f"http://127.0.0.1:{self.server_port}"
        self.configs = component_configs(config, self.run_dir, self.redis_url, self.server_port)
        self.files = {name: self._write_config(name, values) for name, values in self.configs.items()}
        self.children: dict[str, Child] = {}
        self.restart_counts: dict[str, int] = {}
        self.backoff_steps: dict[str, int] = {}  # restarts in a row, each child dying within RAN_WELL_S
        self.started_at: dict[str, float] = {}
        self.secret_env = {
            "FLYWHEEL_SERVE_ADMIN_TOKEN": self.admin_token,
            "FLYWHEEL_TRAIN_ADMIN_TOKEN": self.admin_token,
        }
        self.state_path.write_text(json.dumps(self.state, indent=2))
        self.state_path.chmod(0o600)

    def _write_config(self, name: str, config: BaseModel) -> Path:
        """Every field of the child's config, as the child reads it (`--config FILE`): what ran is on disk."""
        path = self.run_dir / "config" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return path

    def _record_pids(self) -> None:
        pids = {name: c.proc.pid for name, c in self.children.items() if c.proc is not None and c.poll() is None}
        (self.run_dir / "up" / "pids.json").write_text(json.dumps(pids))

    def start(self, name: str, child: Child) -> Child:
        self.started_at[name] = time.monotonic()
        self.children[name] = child.start()
        self._record_pids()
        return child

    # ------------------------------------------------------------ redis and server
    def start_redis(self) -> None:
        if self.config.redis_url:
            return
        binary = shutil.which(self.config.redis_server)
        if binary is None:
            raise UserError(
                f"{self.config.redis_server} not found on PATH: install it (apt-get install redis-server) or pass "
                "--redis-url"
            )
        port = self.redis_url.rsplit(":", 1)[1].split("/")[0]
        argv = [
            binary,
            "--port",
            port,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.run_dir / "redis"),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        self.start("redis", Child("redis", argv, self.run_dir / "logs" / "redis.log"))
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        deadline = time.time() + 30
        while True:
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if self.children["redis"].poll() is not None or time.time() > deadline:
                raise UserError(
                    "redis-server did not start; see "
                    f"{self.children['redis'].log_path}:\n{self.children['redis'].log_tail()}"
                )
            time.sleep(0.2)
        client.close()

    def start_server(self) -> None:
        from flywheel.clients.endpoint import wait_healthy

        child = self.start("server", cli_child("server", ["serve"], self.files["serve"], self.run_dir, self.secret_env))
        print(f"flywheel up: starting the server on {self.server_url} (log: {child.log_path})", flush=True)
        problem = wait_healthy(self.server_url, child, self.config.startup_timeout_s)
        if problem:
            raise UserError(f"the server {problem}; see {child.log_path}:\n{child.log_tail()}")
        self.restore_served_version()

    def restore_served_version(self) -> None:
        """A server restarted on the loop's data dir comes back with the version it served
        (server/weights/restore.py); one that does not have it (a new data dir, or a version it could
        not restore) gets the trainer's latest checkpoint pushed as the version it had, so records and
        trainer count versions alike."""
        found = latest_train_state(self.run_dir / "train")
        if found is None or found[1].pushed_version <= 0:
            return
        from flywheel.server.status import fetch_status
        from flywheel.server.weights.client import PushFailed, push_weights

        folder, state = found
        version = state.pushed_version
        served = fetch_status(self.server_url, self.admin_token)
        if served.policy_version >= version and not served.not_serving:
            print(f"flywheel up: resumed: the server restored version {served.policy_version} itself", flush=True)
            return  # it came back with it (or the trainer already pushed a newer one)
        if served.policy_version >= version:  # it knows the version but could not bring its weights back
            version = served.policy_version + 1
        try:
            push_weights(
                self.server_url,
                folder,
                version=version,
                admin_token=self.admin_token,
                source=f"flywheel up resume from {folder.name}",
            )
        except PushFailed:
            if (now := self.served_version()) is not None and now >= version:
                return  # a running trainer pushed a newer version first: ours is refused, rightly
            raise
        print(f"flywheel up: resumed: pushed {folder.name} to the server as version {version}", flush=True)

    def capture_stream(self) -> str | None:
        """The stream the server captures production prompts into, with --production-prompts (else None)."""
        return self.configs["serve"].capture_stream if self.config.production_prompts != "off" else None

    def served_version(self) -> int | None:
        import httpx

        from flywheel.server.status import fetch_status

        try:
            return fetch_status(self.server_url, self.admin_token).policy_version
        except (httpx.HTTPError, ValueError):
            return None

    # ------------------------------------------------------------ restarts
    def restart(self, name: str, rc: int) -> bool:
        """Start again, in place, a component that exited unexpectedly; False once its restarts are used up."""
        done = self.restart_counts.get(name, 0)
        child = self.children[name]
        if done >= self.config.restarts:
            return False
        self.restart_counts[name] = done + 1
        # the delay doubles for a child that keeps dying soon after its start, and starts over for one that
        # ran well before it died (as Docker's restart delay): a sampler that outlived several server
        # restarts waited 30 s before every later restart
        ran_s = time.monotonic() - self.started_at.get(name, 0.0)
        level = 0 if ran_s > RAN_WELL_S else self.backoff_steps.get(name, 0)
        self.backoff_steps[name] = level + 1
        delay = min(self.config.restart_backoff_s * 2**level, 30.0)
        print(
            f"flywheel up: {name} exited with {rc}; restart {done + 1}/{self.config.restarts} in {delay:.1f} s. "
            f"Last lines of {child.log_path}:\n{child.log_tail(5)}",
            file=sys.stderr,
            flush=True,
        )
        child.stop(timeout_s=10.0)  # what is left of its group: vLLM's engine outlives a killed API server
        time.sleep(delay)
        if name == "redis":
            self.start_redis()  # same port, same AOF: every client reconnects to the same queue
        elif name == "server":
            self.start_server()  # and pushes the last checkpointed version unless it came back with it
        else:
            if name == "trainer":
                self._resume_trainer(child)
            self.start(name, child)
        with (self.run_dir / "up" / "restarts.jsonl").open("a") as fh:
            fh.write(json.dumps({"time": time.time(), "name": name, "rc": rc, "restart": done + 1}) + "\n")
        return True

    def _resume_trainer(self, child: Child) -> None:
        """The restarted trainer resumes from its last checkpoint (its config said no resume before the first)."""
        path = Path(child.argv[child.argv.index("--config") + 1])
        values = yaml.safe_load(path.read_text())
        values["resume"] = latest_train_state(self.run_dir / "train") is not None
        path.write_text(yaml.safe_dump(values, sort_keys=False))

    # ------------------------------------------------------------ running
    def run(self) -> int:
        self.start_redis()
        self.start_server()
        if self.config.eval:
            self.start("eval", cli_child("eval", ["eval"], self.files["eval"], self.run_dir))
        status = LoopStatus(self.run_dir, self.server_url, self.configs["train"].queue, self.capture_stream())
        try:
            return self._run_sync(status) if self.config.sync else self._run_async(status)
        finally:
            status.close()

    def _run_async(self, status: LoopStatus) -> int:
        self.start("trainer", trainer_child(self.config, self.files["train"], self.run_dir, self.secret_env))
        self.start("sampler", cli_child("sampler", ["sample", "grpo"], self.files["sample"], self.run_dir))
        return self._watch(status, until="trainer")

    def _run_sync(self, status: LoopStatus) -> int:
        while True:
            found = latest_train_state(self.run_dir / "train")
            step = found[1].step if found else 0
            if step >= self.config.max_steps:
                return self._finish(status)
            rnd = step // self.config.push_every
            sample = self._write_config("sample_round", sync_sample_config(self.configs["sample"], self.config, rnd))
            self.start("sampler", cli_child("sampler", ["sample", "grpo"], sample, self.run_dir))
            if (rc := self._watch(status, until="sampler", finish=False)) != 0:
                return rc
            train = self._write_config(
                "train_round", sync_train_config(self.configs["train"], self.config, found is not None)
            )
            self.start("trainer", trainer_child(self.config, train, self.run_dir, self.secret_env))
            if (rc := self._watch(status, until="trainer", finish=False)) != 0:
                return rc

    def _watch(self, status: LoopStatus, until: str, finish: bool = True) -> int:
        """Refresh the view until `until` exits (0: done); a child failing is restarted, or stops the loop."""
        from rich.console import Console
        from rich.live import Live

        console = Console()
        live_on = self.config.live if self.config.live is not None else console.is_terminal
        title = f"flywheel up ({'sync' if self.config.sync else 'async'}) {self.run_dir}"
        live = Live(console=console, refresh_per_second=2, transient=False) if live_on else None
        status_log = (self.run_dir / "up" / "status.jsonl").open("a")
        try:
            if live:
                live.start()
            while True:
                s = status.sample()
                s["mode"] = "sync" if self.config.sync else "async"
                status_log.write(json.dumps(s) + "\n")
                status_log.flush()
                states = {name: c.state() for name, c in self.children.items()}
                if live:
                    live.update(status_table(s, title, states))
                else:
                    print(
                        f"[flywheel up] v={s.get('policy_version')} step={s.get('step')} produced={s.get('produced')} "
                        f"acked={s.get('acked')} backlog={s.get('backlog')} "
                        f"uniform_dropped={s.get('dropped_uniform_groups')} "
                        f"reward={s.get('reward_mean')} "
                        f"loss={s.get('train_loss')} eval={s.get('eval_score')}",
                        flush=True,
                    )
                    if warning := starvation_warning(s):
                        print(f"[flywheel up] warning: {warning}", flush=True)
                for name, child in list(self.children.items()):
                    rc = child.poll()
                    if rc is None:
                        continue
                    if name == until and rc == 0:
                        self.children.pop(name)
                        return self._finish(status) if finish else 0
                    if rc == 0 and name == "sampler":  # a finite prompt file is used up: the trainer drains the queue
                        self.children.pop(name)
                        break
                    if not self.restart(name, rc):
                        print(
                            f"flywheel up: {name} exited with {rc}"
                            + (f" after {self.config.restarts} restarts" if self.config.restarts else "")
                            + f"; stopping the loop. Last lines of {child.log_path}:\n"
                            f"{child.log_tail()}",
                            file=sys.stderr,
                            flush=True,
                        )
                        return 1
                time.sleep(self.config.refresh_s)
        finally:
            status_log.close()
            if live:
                live.stop()

    def _finish(self, status: LoopStatus) -> int:
        """Training is done: give eval time to score the last version, then record the final accounting."""
        from flywheel.clients.loop_status import last_json_line

        final_version = status.sample().get("policy_version")
        deadline = time.time() + self.config.eval_wait_s
        while (
            self.config.eval
            and "eval" in self.children
            and self.children["eval"].poll() is None
            and time.time() < deadline
        ):
            last = last_json_line(self.run_dir / "eval" / "history.jsonl") or {}
            if final_version is None or last.get("version") == final_version:
                break
            time.sleep(self.config.refresh_s)
        if "sampler" in self.children:  # no more production: the accounting below is a consistent snapshot
            self.children["sampler"].stop()
        final = status.sample()
        (self.run_dir / "up" / "final.json").write_text(json.dumps(final, indent=2))
        print(
            f"flywheel up: done: {final.get('step')} steps, policy version {final.get('policy_version')}, "
            f"produced {final.get('produced')}, acked {final.get('acked')}, pending {final.get('pending')}, "
            f"dead-lettered {final.get('dead_lettered')}, groups dropped as uniform "
            f"{final.get('dropped_uniform_groups')}",
            flush=True,
        )
        return 0

    def stop_all(self) -> None:
        # consumers first, then the server, Redis last (it flushes its AOF on SIGTERM)
        for name in ("eval", "sampler", "trainer", "server", "redis"):
            if name in self.children:
                self.children[name].stop()
        self._record_pids()


def run(config: LoopConfig) -> int:
    if config.batch_size % config.group_size:
        raise UserError(
            f"--batch-size {config.batch_size} must be a multiple of --group-size {config.group_size} (whole groups "
            "per step)"
        )
    loop = Loop(config)  # builds and validates every component's config first
    # orphans of our children (vLLM's engine and workers when their parent dies first) come to us, not
    # to PID 1, so a stop can reap them and wait until each child's group is really empty
    process_group.become_subreaper()
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 1
    try:
        code = loop.run()
    except Stop as why:
        print(
            f"flywheel up: {why}: stopping every component; state kept in {loop.run_dir} (run again to resume)",
            flush=True,
        )
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        loop.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if config.report:
        from flywheel.clients.report import write_report

        try:
            print(f"flywheel up: report: {write_report(loop.run_dir)}", flush=True)
        except Exception as exc:  # a report must never hide the loop's own outcome
            print(f"flywheel up: could not write the report: {type(exc).__name__}: {exc}", file=sys.stderr)
    return code
