"""Data parallelism on the megatron backend (torchrun + gloo, CPU): two replicas split each step's
micro-batches between them and sum their gradients, so DP=2 trains the same losses and weights as
one process while each replica runs only its share of the forwards.
This file is also the worker (`python tests/test_megatron_data_parallel.py --worker ...`).
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

from flywheel.server.net import free_port as _free_port  # noqa: E402
from tests.test_megatron_resume import hf_weights, losses, train_config, write_sft_data  # noqa: E402

STEPS = 3


def _worker(model: str, data: Path, run_dir: Path) -> None:
    import torch.distributed as dist

    from flywheel.trainer.megatron.policy import MegatronPolicy
    from flywheel.trainer.train import train

    calls = {"forwards": 0}
    forward = MegatronPolicy.forward_logprobs

    def counted(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls["forwards"] += 1
        return forward(self, *args, **kwargs)

    MegatronPolicy.forward_logprobs = counted
    train(train_config(model, data, run_dir, 1, 1, 1, max_steps=STEPS, save_every=STEPS))
    rank = dist.get_rank() if dist.is_initialized() else 0
    (run_dir / f"forwards_rank{rank}.json").write_text(json.dumps(calls))


def launch(model: Path, data: Path, run_dir: Path, ranks: int) -> None:
    worker = [__file__, "--worker", str(model), str(data), str(run_dir)]
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(_free_port()),
            *worker,
        ]
        if ranks > 1
        else [sys.executable, *worker]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow  # a plain run and a 2-rank torchrun run: ~90 s on the shared 2-core machine
def test_two_replicas_split_the_step_and_train_like_one(tmp_path):
    from flywheel.server.models import resolve_model

    model = Path(resolve_model("tiny-qwen3"))
    data = write_sft_data(tmp_path / "sft.jsonl")
    launch(model, data, tmp_path / "one", ranks=1)
    launch(model, data, tmp_path / "dp2", ranks=2)
    one, dp2 = losses(tmp_path / "one"), losses(tmp_path / "dp2")
    assert [s for s, _ in one] == [s for s, _ in dp2] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, dp2)) < 1e-5, (one, dp2)
    final = f"step_{STEPS:06d}"
    a, b = hf_weights(tmp_path / "one" / "checkpoints" / final), hf_weights(tmp_path / "dp2" / "checkpoints" / final)
    assert set(a) == set(b) and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), f"{name}: {(a[name] - b[name]).abs().max():.3g}"
    # each replica ran only its share of the forwards; together exactly the single run's
    single = json.loads((tmp_path / "one" / "forwards_rank0.json").read_text())["forwards"]
    shares = [json.loads((tmp_path / "dp2" / f"forwards_rank{r}.json").read_text())["forwards"] for r in (0, 1)]
    assert single >= 2 * STEPS and sum(shares) == single and all(0 < s < single for s in shares), (single, shares)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "DATA", "RUN_DIR"), required=True)
    a = parser.parse_args().worker
    _worker(a[0], Path(a[1]), Path(a[2]))
