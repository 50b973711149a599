"""`flywheel eval` against a real tiny-model server: log-likelihood scoring matches HF transformers
on the same weights, runs leave well-formed records/summary/report, --watch evaluates a version
once, and bad input fails with one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from flywheel.clients.eval.datasets import load_mmlu_dev
from flywheel.clients.eval.runner import QuerySettings, grade, query_all

FLYWHEEL = [sys.executable, "-m", "flywheel.clients.cli"]


def _flywheel(*args, timeout=300):
    return subprocess.run(FLYWHEEL + list(args), capture_output=True, text=True, timeout=timeout)


def hf_continuation_logprobs(model, tok, context: str, continuations: list[str]) -> list[float]:
    """Independent reference: sum of HF transformers logprobs of the tokens of context+continuation
    that overlap the continuation's characters."""
    import torch

    out = []
    for cont in continuations:
        enc = tok(context + cont, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        total = 0.0
        for i, (_, e) in enumerate(enc["offset_mapping"]):
            if i > 0 and e > len(context):
                total += logp[i - 1, enc["input_ids"][i]].item()
        out.append(total)
    return out


def test_mmlu_loglikelihood_matches_hf(server, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    items = load_mmlu_dev()[:3]
    s = QuerySettings(base_url=server.base_url, model=server.model, prompt_format="completion")
    samples = asyncio.run(query_all(items, s))
    grade(samples)
    for sample in samples:
        assert sample.error is None, sample.error
        ref = hf_continuation_logprobs(model, tok, sample.prompt, sample.item.choices)
        assert sample.choice_logprobs == pytest.approx(ref, abs=2e-2)
        # the scorer picks the choice the model makes most likely
        ranked = sorted(range(len(ref)), key=lambda i: -ref[i])
        if ref[ranked[0]] - ref[ranked[1]] > 0.05:
            assert sample.completions == [sample.item.choices[ranked[0]].strip()]
        assert sample.score == float(sample.completions[0] == sample.item.answer)


def test_loglikelihood_forced_answer(server, tiny_model):
    """Force the answer: among continuations that are one token each, the one the model itself ranks
    first after the context must win, whatever the (random) model is. The candidates come from the
    server's top_logprobs for the next token, kept only when context+token tokenizes as the context's
    tokens plus that one token (so the continuation is scored as exactly that token)."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from flywheel.clients.eval.datasets import EvalItem

    context = "The following is a multiple choice question.\nAnswer:"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = tok.encode(context, add_special_tokens=False)
    client = OpenAI(base_url=server.base_url, api_key="x")
    top = (
        client.completions.create(model=server.model, prompt=context, max_tokens=1, temperature=0, logprobs=20)
        .choices[0]
        .logprobs.top_logprobs[0]
    )
    ranked = [t for t, _ in sorted(top.items(), key=lambda kv: -kv[1])]
    single = [
        t
        for t in ranked
        if t
        and tok.encode(context + t, add_special_tokens=False) == base + tok.encode(t, add_special_tokens=False)
        and len(tok.encode(t, add_special_tokens=False)) == 1
    ]
    assert len(single) >= 4, ranked
    best, others = single[0], single[1:4]
    choices = [others[0], best, others[1], others[2]]  # the forced answer is not first, so position cannot win
    item = EvalItem(
        id="forced",
        benchmark="t",
        prompt=context,
        answer=best.strip(),
        scorer="loglikelihood_choice",
        kind="loglikelihood",
        choices=choices,
    )
    sample = asyncio.run(
        query_all([item], QuerySettings(base_url=server.base_url, model=server.model, prompt_format="completion"))
    )[0]
    grade([sample])
    assert sample.choice_logprobs.index(max(sample.choice_logprobs)) == 1, (choices, sample.choice_logprobs)
    assert sample.choice_logprobs[1] == pytest.approx(top[best], abs=1e-3)
    assert sample.score == 1.0


def test_eval_cli_run_directory(server, tmp_path):
    out = tmp_path / "run"
    proc = _flywheel(
        "eval",
        "--base-url",
        server.base_url,
        "--benchmarks",
        "gsm8k-style",
        "mmlu-dev",
        "mmlu-dev-generative",
        "--limit",
        "3",
        "--max-tokens",
        "8",
        "--num-fewshot",
        "1",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"gsm8k-style", "mmlu-dev", "mmlu-dev-generative"}
    for v in summary["benchmarks"].values():
        assert v["n"] == 3 and v["errors"] == 0 and 0.0 <= v["score"] <= 1.0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9
    gen = [r for r in rows if r["benchmark"] == "gsm8k-style"]
    assert all(len(r["completions"]) == 1 and r["rewards"][0]["name"] == "math_verify" for r in gen)
    assert all(
        r["prompt"][0]["role"] == "user" and len(r["prompt"]) == 3 for r in gen
    )  # 1 shot = user+assistant, then the item
    assert {r["policy_version"] for r in rows} == {0}  # Flywheel's version header, version 0 at start
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_eval_humaneval_pass_at_k_and_collection(server, tmp_path):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text("eval:\n  collections:\n    mix: {champ: 1, ifbench: 1}\n")
    out = tmp_path / "run"
    proc = _flywheel(
        "eval",
        "--config",
        str(cfg),
        "--base-url",
        server.base_url,
        "--benchmarks",
        "humaneval",
        "mix",
        "--limit",
        "2",
        "--n-samples",
        "2",
        "--pass-k",
        "1",
        "2",
        "--temperature",
        "1.0",
        "--max-tokens",
        "8",
        "--prompt-format",
        "completion",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())["benchmarks"]
    he = summary["humaneval"]
    assert he["errors"] == 0 and summary["mix"]["errors"] == 0
    assert he["n"] == 2 and he["pass@1"] <= he["pass@2"] and he["metric"] == "pass@1"
    assert set(summary["mix"]["members"]) == {"champ", "ifbench"} and summary["mix"]["n"] == 2
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(len(r["completions"]) == 2 for r in rows if r["benchmark"] == "humaneval")
    assert all(r["rewards"][0]["name"] == "code_exec" for r in rows if r["benchmark"] == "humaneval")


def test_eval_watch_evaluates_each_version_once(server, tmp_path):
    history = tmp_path / "history.jsonl"
    args = [
        "eval",
        "--base-url",
        server.base_url,
        "--benchmarks",
        "mmlu-dev",
        "--limit",
        "2",
        "--watch",
        "--history",
        str(history),
        "--output-dir",
        str(tmp_path / "runs"),
        "--poll-s",
        "0.2",
        "--watch-timeout-s",
        "1",
    ]
    proc = _flywheel(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _flywheel(*args)  # restarted watcher: version 0 is already in the history
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["version"] for r in rows] == [0] and "mmlu-dev" in rows[0]["scores"]
    assert (tmp_path / "runs" / "v0" / "summary.json").is_file()
    plot = _flywheel("eval", "plot", "--history", str(history), "--output", str(tmp_path / "acc.png"))
    assert plot.returncode == 0 and (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def _one_line_error(proc, *needles):
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "\n" not in err and err.startswith("flywheel eval: error:"), err
    for n in needles:
        assert n in err, err


def test_eval_bad_input(server, tmp_path):
    _one_line_error(
        _flywheel("eval", "--base-url", "http://127.0.0.1:9/v1", "--benchmarks", "mmlu-dev"), "cannot reach"
    )
    _one_line_error(
        _flywheel("eval", "--base-url", server.base_url, "--benchmarks", "gsm9k"), "unknown benchmark 'gsm9k'"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": \n')
    _one_line_error(_flywheel("eval", "--base-url", server.base_url, "--benchmarks", f"custom:{bad}"), "bad.jsonl:2")
    _one_line_error(
        _flywheel("eval", "--base-url", server.base_url, "--benchmarks", f"custom:{tmp_path}/missing.jsonl"),
        "not found",
    )
