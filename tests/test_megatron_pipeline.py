"""Pipeline parallelism on the megatron backend: PP=2 through megatron-core's 1F1B schedule (torchrun + gloo, CPU).

SFT through trainer.train on tiny-qwen3 (2 layers: one per stage; tied embeddings, so the first
stage's embedding and the last stage's output layer must stay one tensor) gives, step by step, the
losses and gradient norms of PP=1 on the same batches, and the same final HF checkpoint.
Each step accumulates over more than one token-budget micro-batch (packed rows of varying length).
This file is also the torchrun worker (`python tests/test_megatron_pipeline.py --worker ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel.server.net import free_port as _free_port  # noqa: E402  (one free-port helper for every launcher)
from tests.test_megatron_resume import hf_weights, train_config, write_sft_data  # noqa: E402

STEPS = 3


def _worker(model: str, data: Path, root: Path) -> None:
    from flywheel.trainer.train import train

    for name, pipeline in (("pp2", 2), ("pp1", 1)):  # pp1 at world size 2 is two data-parallel replicas
        train(train_config(model, data, root / name, 1, pipeline, 1, max_steps=STEPS, save_every=STEPS))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # one torchrun launch of 2 ranks training twice: ~60-90 s on the shared 2-core machine
def test_pipeline_parallel_matches_pp1(tmp_path):
    from flywheel.server.models import resolve_model

    model = Path(resolve_model("tiny-qwen3"))
    data = write_sft_data(tmp_path / "sft.jsonl")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        __file__,
        "--worker",
        str(model),
        str(data),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pp2, pp1 = metrics(tmp_path / "pp2"), metrics(tmp_path / "pp1")
    assert [m["step"] for m in pp2] == [m["step"] for m in pp1] == list(range(1, STEPS + 1))
    assert pp2[-1]["loss"] < pp2[0]["loss"]  # it trains
    for a, b in zip(pp2, pp1):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (pp2, pp1)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"], (pp2, pp1)
    final = f"step_{STEPS:06d}"
    a, b = hf_weights(tmp_path / "pp2" / "checkpoints" / final), hf_weights(tmp_path / "pp1" / "checkpoints" / final)
    assert set(a) == set(b) and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), f"{name}: {(a[name] - b[name]).abs().max():.3g}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "DATA", "ROOT"), required=True)
    a = parser.parse_args().worker
    _worker(a[0], Path(a[1]), Path(a[2]))
