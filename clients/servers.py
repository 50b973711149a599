"""Start and stop real `flywheel serve` processes and throwaway redis-servers, for tests and benchmarks.

Only one vLLM server runs at a time on this machine: `start_server` takes an exclusive lock on
/tmp/flywheel-vllm.lock for the life of the server (other test runs and benchmarks wait).
Lives in clients/ (which may import anything) so that tests/ and bench/ share it without bench/
importing tests/.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flywheel.clients.endpoint import wait_healthy
from flywheel.server.net import free_port

LOCK = Path("/tmp/flywheel-vllm.lock")
STARTUP_TIMEOUT_S = float(os.environ.get("FLYWHEEL_TEST_STARTUP_TIMEOUT", "420"))


@dataclass
class RunningServer:
    url: str
    model: str
    admin_token: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def admin_headers(self) -> dict:
        return {"authorization": f"Bearer {self.admin_token}"}

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


_held = {"depth": 0, "fh": None}


@contextmanager
def vllm_lock():
    """Exclusive across processes, re-entrant within one (a test may start a second server
    while the session's server is idle: that costs memory, not CPU)."""
    if _held["depth"] == 0:
        LOCK.touch(exist_ok=True)
        _held["fh"] = open(LOCK, "w")
        fcntl.flock(_held["fh"], fcntl.LOCK_EX)
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if _held["depth"] == 0:
            fcntl.flock(_held["fh"], fcntl.LOCK_UN)
            _held["fh"].close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, even if it is SIGKILLed."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _flag(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


@contextmanager
def start_server(model: str | os.PathLike, workdir: Path, **overrides):
    """Run `flywheel serve` on `model` until the block exits; yields a RunningServer."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    admin_token = overrides.pop("admin_token", secrets.token_hex(8))
    settings = {
        "port": free_port(),
        "data_dir": workdir / "data",
        "kv_cache_gib": 1,
        "max_model_len": 1024,
        "max_num_seqs": 32,
        "admin_token": admin_token,
        **overrides,
    }
    served_name = overrides.get("served_model_name") or Path(model).name
    settings.setdefault("served_model_name", served_name)
    argv = [sys.executable, "-m", "flywheel.clients.cli", "serve", "--model", str(model)]
    for key, value in settings.items():
        if value is not None:
            argv += _flag(key, value)
    with launch(
        argv, workdir, settings["port"], served_name, admin_token=admin_token, api_key=settings.get("api_key")
    ) as server:
        yield server


@contextmanager
def launch(
    argv: list[str],
    workdir: Path,
    port: int,
    model: str,
    admin_token: str = "",
    api_key: str | None = None,
    env: dict | None = None,
    what: str = "flywheel serve",
):
    """Start a server process under the one-server lock, wait for /health, stop it on exit."""
    log_path = Path(workdir) / "server.log"
    with vllm_lock():
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=env,
                cwd=Path(__file__).resolve().parents[1],
            )
        server = RunningServer(
            url=f"http://127.0.0.1:{port}",
            model=model,
            admin_token=admin_token,
            process=proc,
            log_path=log_path,
            api_key=api_key,
        )
        try:
            problem = wait_healthy(server.url, proc, STARTUP_TIMEOUT_S)
            if problem:
                raise RuntimeError(f"{what} {problem}:\n{server.log_tail()}")
            yield server
        finally:
            stop_server(proc)


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL of the whole process group if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    try:  # whatever the server started must be gone with it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.returncode


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server on loopback (no persistence), answering PING; returns (process, url).

    The caller stops it (terminate). `port`: restart one on the port it had (a test of a Redis restart)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get update && apt-get install -y redis-server")
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"
