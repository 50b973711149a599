"""The served policy's version: 0 for the checkpoint the server started from, +1 per successful push.

Lives in the API server process (one per `flywheel serve`). The weight-update route is the only
writer and holds `update_lock` for the whole update, so versions are strictly monotonic and a
version number is published only after its weights are fully applied.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

MAX_LISTED = 100


@dataclass
class PolicyState:
    model: str
    served_model_name: str
    version: int = 0
    started_at: float = field(default_factory=time.time)
    updated_at: float | None = None
    history: list[dict] = field(default_factory=list)  # one entry per applied push (bounded)
    failed_pushes: int = 0
    broken: str | None = None  # set when an update failed half-applied: serving stops until a push succeeds
    admin_paused: bool = False  # an admin paused generation: a push must leave it paused
    published: list[int] = field(default_factory=list)  # the versions pushed, in order (bounded)
    update_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def publish(self, version: int, **info) -> None:
        """Make `version` the served one; called with update_lock held, after the weights are applied."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than {self.version}")
        self.version = version
        self.broken = None
        self.updated_at = time.time()
        self.history.append({"version": version, "at": self.updated_at, **info})
        del self.history[:-100]
        self.published.append(version)
        del self.published[:-MAX_LISTED]

    def versions_since(self, start: int) -> list[int]:
        """Every version served from `start` until now: the ones that may have produced a response.
        Versions need not be consecutive (a push may jump), so they come from the record of pushes,
        never from a range; a request that spanned more than MAX_LISTED pushes lists the last ones."""
        return [start] + [v for v in self.published if v > start][-MAX_LISTED:]
