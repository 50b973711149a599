"""`flywheel up` owns its process tree: stopping a child leaves nothing of its group behind, whatever the
machine's init does with orphans (it reaps them itself, as subreaper), and zombies count as dead."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flywheel.clients import process_group

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")

# A component whose own child outlives it: the child (same process group) takes `grace` seconds to
# shut down on SIGTERM (or ignores it), while its parent exits at once, as vLLM's API server can.
COMPONENT = textwrap.dedent("""
    import os, signal, sys, time
    marker, grace, ignore = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "ignore"
    if os.fork() == 0:
        def graceful(*_):
            time.sleep(grace)
            open(marker, "w").write("graceful")
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else graceful)
        open(marker + ".tmp", "w").write(str(os.getpid()))
        os.replace(marker + ".tmp", marker + ".ready")  # whole or absent: the stopper reads it once it exists
        while True:
            time.sleep(0.1)
    while not os.path.exists(marker + ".ready"):
        time.sleep(0.02)
    time.sleep(3600)  # SIGTERM's default action ends this process at once
""")

# The stopping side, in a process of its own: becoming a subreaper must not change pytest itself.
STOPPER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from flywheel.clients import process_group
    from flywheel.clients.up import Child
    component, marker, grace, mode, timeout_s = sys.argv[1:6]
    adopted = process_group.become_subreaper()
    child = Child("component", [sys.executable, "-c", component, marker, grace, mode], Path(marker + ".log")).start()
    try:
        deadline = time.monotonic() + 60
        while not Path(marker + ".ready").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the component's child never started")
            time.sleep(0.02)
        grandchild = int(Path(marker + ".ready").read_text())
        t0 = time.monotonic()
        child.stop(timeout_s=float(timeout_s))
        took = time.monotonic() - t0
    except BaseException:  # whatever failed here, leave nothing of the component running
        import os, signal
        os.killpg(child.proc.pid, signal.SIGKILL)
        raise
    print(json.dumps({"adopted": adopted, "took": took, "pgid": child.proc.pid, "grandchild": grandchild,
                      "left": [m.__dict__ for m in process_group.members(child.proc.pid)]}))
""")


def stop_component(tmp_path: Path, grace: float, mode: str, timeout_s: float) -> dict:
    marker = tmp_path / "grandchild"
    out = subprocess.run(
        [sys.executable, "-c", STOPPER, COMPONENT, str(marker), str(grace), mode, str(timeout_s)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["graceful"] = marker.exists()
    return result


def test_stop_waits_for_the_grandchild_to_shut_down_and_reaps_it(tmp_path):
    """The leader exits at once on SIGTERM; its child needs 1.5 s. The stop must give it that time (not
    SIGKILL it because the leader is gone), and leave no member of the group, not even a zombie."""
    result = stop_component(tmp_path, grace=1.5, mode="graceful", timeout_s=20)
    assert result["adopted"] is True
    assert result["graceful"], "the grandchild was killed before its SIGTERM grace ran out"
    assert result["left"] == [], result
    assert 1.4 < result["took"] < 15, result


def test_stop_kills_a_grandchild_that_ignores_sigterm_and_reaps_it(tmp_path):
    result = stop_component(tmp_path, grace=0, mode="ignore", timeout_s=1.0)
    assert not result["graceful"]
    assert result["left"] == [], result  # SIGKILLed after 1 s, then reaped by the stopper (its subreaper)
    assert 0.9 < result["took"] < 12, result


def test_a_group_of_zombies_is_gone_and_a_running_one_is_not():
    """`os.killpg(pgid, 0)` succeeds for a group whose only member is a zombie: `left` must not count it."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import os, sys, time
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            time.sleep(float(sys.argv[1]))
            os._exit(0)
        os.setpgid(pid, pid)  # the parent too (the classic fork race): the group exists before its pid is printed
        print(pid, flush=True)
        time.sleep(60)  # never waits for it: the child stays a zombie of this parent
    """),
            "0.5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pgid = int(parent.stdout.readline())
        assert [m.running for m in process_group.members(pgid)] == [True]
        assert process_group.left(pgid)
        assert process_group.wait_gone(pgid, timeout_s=10)
        os.killpg(pgid, 0)  # the group still exists for the kernel...
        assert [m.state for m in process_group.members(pgid)] == ["Z"]  # ...as one zombie, which is dead
        assert process_group.left(pgid) == []
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.time() + 10
    while process_group.members(pgid) and time.time() < deadline:
        time.sleep(0.05)
