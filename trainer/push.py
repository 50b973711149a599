"""Weight push every K optimizer steps: version = last pushed + 1, through server/weights/client.py."""

from __future__ import annotations

import time

from trainer.config import TrainConfig


class WeightPusher:
    """Pushes the policy's HF-named weights to the server; a no-op when no endpoint is configured."""

    def __init__(self, config: TrainConfig):
        self.url = config.push_url
        self.every = config.push_every
        self.token = config.admin_token or ""
        self.enabled = bool(self.url) and self.every > 0

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def push(self, policy, version: int, step: int) -> dict:
        """Push and return metrics; raises on a refused push (the trainer must not believe a version it did not create)."""
        try:
            from server.weights.client import push_weights
        except ImportError:
            raise SystemExit("flywheel train: error: --push-url is set but server/weights/client.py is not available") from None
        weights = policy.state_dict_hf()
        start = time.perf_counter()
        push_weights(self.url, weights, version=version, admin_token=self.token, source=f"trainer step {step}")
        return {"pushed_version": version, "push_s": time.perf_counter() - start}
