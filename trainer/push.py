"""Weight push every K optimizer steps: version = last pushed + 1, through server/weights/client.py."""

from __future__ import annotations

import time

import httpx

from server.errors import UserError
from server.status import fetch_status
from trainer.config import TrainConfig


class WeightPusher:
    """Pushes the policy's HF-named weights to the server; a no-op when no endpoint is configured."""

    def __init__(self, config: TrainConfig):
        self.url = (config.push_url or "").rstrip("/").removesuffix("/v1")
        self.every = config.push_every
        self.token = config.admin_token or ""
        self.enabled = bool(self.url) and self.every > 0
        self.checked_server = False
        self.buckets = None  # ShmBuckets, made on the first push to a server on this host

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

    def push(self, policy, last_version: int, step: int) -> tuple[int, dict]:
        """Push as the next version; returns (version, metrics). Raises PushFailed on a refused push.

        A run resumed from a checkpoint older than its last push would reuse a version the server
        already has (and be refused): on the first push of a process, continue from the served
        version when it is ahead of the checkpoint's.
        """
        try:
            from server.weights.client import auto_transport, push_weights
            from server.weights.shm_buckets import ShmBuckets
        except ImportError:
            raise UserError("--push-url is set but server/weights/client.py is not available") from None
        if not self.checked_server:
            self.checked_server = True
            served = self.served_version()
            if served is not None and served > last_version:
                last_version = served
        version = last_version + 1
        if self.buckets is None and auto_transport(self.url) == "shm":
            # the same layout every push: overwrite last push's files instead of writing new ones
            self.buckets = ShmBuckets()
        start = time.perf_counter()
        push_weights(self.url, policy.state_dict_hf(), version=version, admin_token=self.token,
                     source=f"trainer step {step}", buckets=self.buckets)
        return version, {"pushed_version": version, "push_s": time.perf_counter() - start}
