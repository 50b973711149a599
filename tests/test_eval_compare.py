"""`flywheel eval compare` and `flywheel eval plot` on run directories written by report.write_run."""

from __future__ import annotations

import json
import subprocess
import sys

from flywheel.clients.eval.compare import compare_runs, paired_bootstrap
from flywheel.clients.eval.datasets import load_gsm8k_style
from flywheel.clients.eval.report import read_samples, write_run
from flywheel.clients.eval.runner import Sample, grade
from flywheel.clients.eval.watch import plot_history, read_history


def _run(tmp_path, name, right_ids):
    """A run on 12 gsm8k-style items, graded by the real scorer: right on `right_ids`, wrong elsewhere."""
    items = load_gsm8k_style(size=4)
    samples = []
    for x in items:
        reply = f"Answer: {x.answer}" if x.id in right_ids else "Answer: -12345"
        samples.append(Sample(item=x, prompt=x.prompt, completions=[reply], finish_reasons=["stop"]))
    grade(samples)
    out = tmp_path / name
    write_run(out, {"gsm8k-style": samples}, {"model": "m", "base_url": "u"}, [1])
    return out, [x.id for x in items]


def test_compare_counts_flips_and_ci(tmp_path):
    ids = [x.id for x in load_gsm8k_style(size=4)]
    run_a, _ = _run(tmp_path, "a", set(ids[:4]))
    run_b, _ = _run(tmp_path, "b", set(ids[2:10]))
    summary_a = json.loads((run_a / "summary.json").read_text())
    assert summary_a["benchmarks"]["gsm8k-style"]["score"] == 4 / 12
    assert (run_a / "scores.png").read_bytes()[:4] == b"\x89PNG" and "data:image/png;base64," in (
        run_a / "report.html"
    ).read_text()
    result = compare_runs(run_a, run_b)
    v = result["benchmarks"]["gsm8k-style"]
    assert v["n"] == 12 and v["score_a"] == 4 / 12 and v["score_b"] == 8 / 12
    assert v["delta"] == 4 / 12 and v["improved"] == 6 and v["regressed"] == 2
    assert {f["id"] for f in v["flips"]} == set(ids[:2]) | set(ids[4:10])
    assert v["ci_low"] < v["delta"] < v["ci_high"]


def test_paired_bootstrap_brackets_the_mean():
    diffs = [1.0] * 30 + [0.0] * 70
    lo, hi = paired_bootstrap(diffs, resamples=1000)
    assert 0.15 < lo < 0.3 < hi < 0.45
    assert paired_bootstrap([0.0] * 10) == (0.0, 0.0)


def test_compare_cli(tmp_path):
    ids = [x.id for x in load_gsm8k_style(size=4)]
    run_a, _ = _run(tmp_path, "a", set(ids[:6]))
    run_b, _ = _run(tmp_path, "b", set(ids[:3]))
    out = tmp_path / "cmp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel.clients.cli", "eval", "compare", str(run_a), str(run_b), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gsm8k-style" in proc.stdout and "-0.2500" in proc.stdout
    assert json.loads(out.read_text())["benchmarks"]["gsm8k-style"]["regressed"] == 3
    bad = subprocess.run(
        [sys.executable, "-m", "flywheel.clients.cli", "eval", "compare", str(run_a), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "no samples.jsonl" in bad.stderr


def test_plot_history(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text(
        "".join(
            json.dumps({"version": v, "scores": {"gsm8k-style": 0.1 * v, "mmlu-dev": 0.25}}) + "\n" for v in range(4)
        )
    )
    assert [h["version"] for h in read_history(history)] == [0, 1, 2, 3]
    png = plot_history(history, tmp_path / "acc.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_samples_jsonl_records(tmp_path):
    ids = [x.id for x in load_gsm8k_style(size=4)]
    run, _ = _run(tmp_path, "a", {ids[0]})
    rows = read_samples(run)
    assert len(rows) == 12
    first = next(r for r in rows if r["id"] == ids[0])
    assert first["score"] == 1.0 and first["rewards"][0]["name"] == "math_verify" and first["completions"]
