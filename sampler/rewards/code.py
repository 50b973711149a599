"""Code-execution reward: run HumanEval-style tests against a completion in a sandboxed subprocess.

Never `exec` in the sampler's process. Each program runs in a fresh `python -I -S` child:
- in its own empty temporary directory, with a minimal environment, in its own session;
- under rlimits (CPU seconds, address space, file size, open files, no core dumps);
- under an audit hook (sandbox_child.py) that refuses file access outside that directory,
  processes, sockets and ctypes;
- killed (the whole process group, SIGKILL) when the wall-clock timeout passes, so an infinite
  loop costs at most `timeout_s`.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flywheel.sampler.record import Reward
from flywheel.sampler.rewards.registry import Scorer, register_scorer

CHILD = Path(__file__).with_name("sandbox_child.py")
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def _limits(cpu_s: int, memory_mb: int, file_mb: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_sandboxed(program: str, timeout_s: float = 5.0, memory_mb: int = 1024, file_mb: int = 16) -> dict[str, Any]:
    """Run `program`; returns {'passed', 'result' ('passed' | 'timed out' | 'failed: ...'), 'seconds'}."""
    with tempfile.TemporaryDirectory(prefix="flywheel-sandbox-") as workdir:
        source = Path(workdir) / "solution.py"
        source.write_text(program)
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(CHILD), str(source)],
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limits(int(timeout_s) + 1, memory_mb, file_mb),
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"passed": False, "result": "timed out", "seconds": time.monotonic() - start}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - start
    if proc.returncode == 0:
        return {"passed": True, "result": "passed", "seconds": seconds}
    if proc.returncode < 0:
        return {"passed": False, "result": f"failed: killed by signal {-proc.returncode}", "seconds": seconds}
    lines = err.decode(errors="replace").strip().splitlines()
    return {
        "passed": False,
        "result": f"failed: {lines[-1] if lines else 'exit code ' + str(proc.returncode)}",
        "seconds": seconds,
    }


def code_from_completion(completion: str) -> str:
    """The code in a completion: the last ```python fence if there is one, else the text itself."""
    fenced = _FENCE.findall(completion)
    return fenced[-1] if fenced else completion


def build_program(completion: str, answer: Any) -> str:
    """HumanEval layout: prompt + completion + test + check(entry_point).

    `answer` is a HumanEval problem ({'prompt', 'test', 'entry_point'}) or a string of test code
    (asserts). The prompt is prepended only when the completion does not define the function
    itself (HumanEval completions continue the prompt's signature).
    """
    code = code_from_completion(completion)
    if isinstance(answer, str):
        return f"{code}\n\n{answer}\n"
    entry = answer.get("entry_point")
    problem_prompt = answer.get("prompt", "")
    if entry and re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        problem_prompt = "".join(
            line + "\n" for line in problem_prompt.splitlines() if line.startswith(("import ", "from "))
        )
    program = f"{problem_prompt}{code}\n\n{answer.get('test', '')}\n"
    return program + (f"\ncheck({entry})\n" if entry else "")


@register_scorer("code_exec")
def code_exec_scorer(timeout_s: float = 5.0, memory_mb: int = 1024) -> Scorer:
    """1.0 when the completion passes the tests (HumanEval problem dict or assert code as the answer)."""

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        outcome = run_sandboxed(build_program(completion, answer), timeout_s, memory_mb)
        return Reward(name="code_exec", value=float(outcome["passed"]), details=outcome)

    return score
