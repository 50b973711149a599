"""A process group as Linux sees it: who is in it, who is still running, and reaping what we adopted.

`flywheel up` starts each component in its own process group (vLLM's API server, its engine core,
its workers, tokenizer pools...). Stopping a component means: nothing of that group keeps running
or holding memory. Two facts make "the leader exited" not enough:

- a group whose members are all zombies still exists for `os.killpg(pgid, 0)`, so a zombie must
  count as dead (it holds no memory, only a process-table slot);
- a grandchild whose parent died is re-parented to the nearest *subreaper*, else to PID 1. On a
  machine whose init reaps slowly those zombies linger for seconds. `become_subreaper()` makes us
  that reaper, so orphans of our components come to us and `reap_adopted()` collects them at once,
  and a stop can wait until the group is really empty.

Everything here reads /proc (Linux); elsewhere the group is judged by `os.killpg(pgid, 0)` alone.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@dataclass(frozen=True)
class Member:
    pid: int
    ppid: int
    state: str  # one letter, as in /proc/PID/stat: R S D T Z ...

    @property
    def running(self) -> bool:
        """Anything but a zombie (state Z) or a dead task (X) still runs or holds memory."""
        return self.state not in ("Z", "X")


def become_subreaper() -> bool:
    """Adopt orphaned descendants (instead of PID 1). True when the kernel agreed (Linux >= 3.4)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: str) -> tuple[int, int, str] | None:
    """(ppid, pgid, state) of a process, or None when it vanished meanwhile."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0]


def members(pgid: int) -> list[Member]:
    """Every process of group `pgid`, zombies included."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [Member(pgid, -1, "?")]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(entry)
            if stat is not None and stat[1] == pgid:
                found.append(Member(int(entry), stat[0], stat[2]))
    return found


def reap_adopted(pgid: int, leader: int) -> int:
    """Reap our zombie children in group `pgid`, except `leader` (its Popen reaps it and keeps its
    exit code). These are orphans we adopted as subreaper. Returns how many were reaped."""
    me, reaped = os.getpid(), 0
    for m in members(pgid):
        if m.pid != leader and m.ppid == me and not m.running:
            try:
                if os.waitpid(m.pid, os.WNOHANG)[0] == m.pid:
                    reaped += 1
            except ChildProcessError:
                pass
    return reaped


def left(pgid: int, leader: int | None = None) -> list[Member]:
    """What still keeps group `pgid` from being gone: running members, and zombies that are ours to
    reap (after reaping the adopted ones). A zombie of another parent (PID 1's) is dead: not counted."""
    if leader is not None:
        reap_adopted(pgid, leader)
    me = os.getpid()
    return [m for m in members(pgid) if m.running or m.ppid == me]


def wait_gone(pgid: int, timeout_s: float, leader: int | None = None, poll_leader=None) -> bool:
    """Wait up to `timeout_s` until nothing of group `pgid` is left; True when it is gone.
    `poll_leader` (e.g. Popen.poll) is called on each round so the leader is reaped by its owner."""
    deadline = time.monotonic() + timeout_s
    while True:
        if poll_leader is not None:
            poll_leader()
        if not left(pgid, leader):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
