"""The OpenAI SDK examples run against a real Flywheel server and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys


def _example(name, server, *args):
    proc = subprocess.run(
        [sys.executable, "-m", f"flywheel.clients.examples.{name}", "--base-url", server.base_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_chat_example(server):
    out = _example("chat", server, "--max-tokens", "5", "Hello")
    m = re.search(r"\[model (\S+), (\d+) prompt \+ (\d+) completion tokens, finish (\w+), policy version (\S+)\]", out)
    assert m and m.group(1) == server.model and int(m.group(3)) <= 5 and m.group(5) == "0"


def test_streaming_example(server):
    out = _example("streaming", server, "--max-tokens", "6")
    m = re.search(r"\[(\d+) chunks, (\d+) completion tokens, first token after (\d+) ms, (\d+) ms in all\]", out)
    assert m and 1 <= int(m.group(1)) <= int(m.group(2)) <= 6 and int(m.group(3)) <= int(m.group(4))


def test_logprobs_example(server):
    out = _example("logprobs", server, "--max-tokens", "3", "--top-logprobs", "2", "The capital of France is")
    gen = re.findall(r"^\s+'.*?'\s+(-?\d+\.\d+)\s+\[", out, re.M)
    assert len(gen) == 3 and all(float(v) <= 0 for v in gen)
    assert "(first token: no logprob)" in out
    total = float(re.search(r"log-likelihood of the prompt after its first token: (-?\d+\.\d+)", out).group(1))
    assert total < 0
