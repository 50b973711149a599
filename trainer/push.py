"""Weight push every K optimizer steps: version = last pushed + 1, through server/weights/client.py.

Multi-rank runs (torchrun): every rank calls `next_version` and `push` at the same steps. Rank 0
alone asks the server for its version and broadcasts it (trainer/ranks.py); every rank takes part
in gathering the full HF weights (TP/EP/PP gathers are collectives); rank 0 alone pushes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from flywheel.server.errors import UserError
from flywheel.server.status import fetch_status
from flywheel.server.weights.protocol import CHECKPOINT_NOT_VISIBLE
from flywheel.server.weights.push_answer import PushFailed
from flywheel.trainer.checkpoint import latest_train_state
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.ranks import from_main_rank, is_main_rank


def checkpoint_layout(weights: dict) -> dict:
    """transformers' in-memory tensor names -> the names of its safetensors checkpoints, which a push
    must use (the server checks every push against the served checkpoint's manifest).

    transformers 5 stacks an MoE layer's experts in memory, `mlp.experts.gate_up_proj` [E, 2F, H]
    (gate rows, then up rows) and `mlp.experts.down_proj` [E, H, F]; its checkpoints keep one tensor
    per expert, `mlp.experts.{e}.gate_proj.weight` [F, H], `up_proj.weight` [F, H], `down_proj.weight`
    [H, F] (a stacked push is refused with 400). Everything else passes unchanged; the split tensors
    are views, nothing is copied.
    """
    out = {}
    for name, t in weights.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


class WeightPusher:
    """Pushes the policy's HF-named weights to the server; a no-op when no endpoint is configured."""

    def __init__(self, config: TrainConfig):
        self.url = (config.push_url or "").rstrip("/").removesuffix("/v1")
        self.every = config.push_every
        self.token = config.admin_token or ""
        self.enabled = bool(self.url) and self.every > 0
        self.checked_server = False
        self.buckets = None  # ShmBuckets, made on the first push to a server on this host
        self.retries, self.backoff_s = config.push_retries, config.push_backoff_s
        self.requested_transport = config.push_transport
        self.transport: str | None = None  # resolved on the first push
        self.run_dir = config.run_dir
        self.server_sees_checkpoints = True  # until a server on another host refuses the checkpoint's path

    def close(self) -> None:
        if self.buckets is not None:
            self.buckets.close()
            self.buckets = None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def served_version(self) -> int | None:
        try:
            return fetch_status(self.url, self.token).policy_version
        except (httpx.HTTPError, ValueError):
            return None

    def resolve_transport(self, weights: dict) -> str:
        """The transport of every push of this run, decided once (push_transport's description)."""
        from flywheel.server.weights.client import auto_transport, is_loopback

        if self.requested_transport != "auto":
            return self.requested_transport
        on_gpu = any(getattr(t, "is_cuda", False) for t in weights.values())
        if on_gpu and is_loopback(self.url):
            try:
                offered = fetch_status(self.url, self.token).weights.transports
            except (httpx.HTTPError, ValueError):
                offered = []
            if "ipc" in offered:
                return "ipc"
        return auto_transport(self.url)

    def next_version(self, last_version: int) -> int:
        """The version the next push creates: last pushed + 1.

        A run resumed from a checkpoint older than its last push would reuse a version the server
        already has (and be refused): on the first push of a process, continue from the served
        version when it is ahead of the checkpoint's.
        """
        if not self.checked_server:
            self.checked_server = True
            # rank 0 asks; every rank must continue from the same number (a collective: all ranks call this)
            served = from_main_rank(self.served_version() if is_main_rank() else None)
            if served is not None and served > last_version:
                last_version = served
        return last_version + 1

    def push(self, policy, version: int, step: int) -> dict:
        """Push the policy as `version` (already in a durable checkpoint); returns metrics (rank 0's; {} elsewhere).

        Every rank calls it: gathering the weights is a collective; only rank 0 sends them.

        A server that restarts or stalls mid-push (connection reset, 5xx, timeout) is retried with
        backoff, `retries` times; a refused push (4xx: the weights do not fit the served model) is
        a bug and raises. If every attempt fails the run goes on: the version stays in the
        checkpoint, so a restarted server gets it again, and the next push supersedes it.
        """
        try:
            from flywheel.server.weights.client import push_adapter, push_weights
            from flywheel.server.weights.shm_buckets import ShmBuckets
        except ImportError:
            raise UserError("--push-url is set but server/weights/client.py is not available") from None
        source = f"trainer step {step}"
        if self.requested_transport == "adapter":  # a LoRA run: only the adapter travels
            tensors, adapter_config = policy.adapter_state()  # UserError unless the policy has an adapter
            return self._with_retries(
                version, lambda: push_adapter(self.url, tensors, adapter_config, version, self.token, source=source)
            )
        weights = policy.state_dict_hf()  # every rank: the TP/EP/PP gathers are collectives
        if not is_main_rank():
            return {}
        weights = checkpoint_layout(weights)
        if self.transport is None:
            self.transport = self.resolve_transport(weights)
            print(f"flywheel train: pushing weights to {self.url} over {self.transport}", file=sys.stderr, flush=True)
        if self.buckets is None and self.transport == "shm":
            # the same layout every push: overwrite last push's files instead of writing new ones
            self.buckets = ShmBuckets()

        def send(checkpoint: Path | None):
            return lambda: push_weights(
                self.url,
                weights,
                version=version,
                admin_token=self.token,
                transport=self.transport,
                source=source,
                buckets=self.buckets,
                checkpoint=checkpoint,
            )

        checkpoint = self.checkpoint_of(step, version) if self.server_sees_checkpoints else None
        try:
            return self._with_retries(version, send(checkpoint))
        except PushFailed as exc:
            if checkpoint is None or CHECKPOINT_NOT_VISIBLE not in exc.message:
                raise
        self.server_sees_checkpoints = False
        print(
            f"flywheel train: the server cannot read the checkpoint folder {checkpoint} (another host?): pushing "
            "without it; a restarted server will refuse traffic until the next push instead of serving this version",
            file=sys.stderr,
            flush=True,
        )
        return self._with_retries(version, send(None))

    def checkpoint_of(self, step: int, version: int) -> Path | None:
        """The durable checkpoint holding this push's weights (written just before it, as `version`):
        named in the push, it lets a restarted server serve this version again (server/weights/served_record.py)."""
        found = latest_train_state(self.run_dir)
        if found is None or found[1].step != step or found[1].pushed_version != version:
            return None
        return found[0].resolve()

    def _with_retries(self, version: int, send) -> dict:
        from flywheel.server.weights.client import PushFailed

        start, failures, error = time.perf_counter(), 0, None
        for attempt in range(self.retries + 1):
            try:
                send()
                break
            except PushFailed as exc:
                served = self.served_version()
                if served is not None and served >= version:
                    break  # an earlier attempt was applied; only its answer was lost
                if 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
                    raise
                error = exc
            except httpx.HTTPError as exc:  # the server went away or stalled mid-push
                error = exc
            failures += 1
            if attempt < self.retries:
                delay = min(self.backoff_s * 2**attempt, 30.0)
                print(
                    f"flywheel train: push of version {version} failed ({type(error).__name__}: {error}); "
                    f"retry {attempt + 1}/{self.retries} in {delay:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
        else:
            print(
                f"flywheel train: push of version {version} failed {failures} times; training goes on "
                f"(the next push supersedes it): {error}",
                file=sys.stderr,
                flush=True,
            )
            return {"push_failures": failures, "push_failed_version": version, "push_s": time.perf_counter() - start}
        return {"pushed_version": version, "push_s": time.perf_counter() - start, "push_failures": failures}
