"""`--resume` on the megatron backend under torchrun + gloo (CPU): TP=2 (dense) and EP=2 (MoE).

One torchrun run trains N+M steps straight in one run_dir and the first N steps (stop_after) in
another; a second torchrun run resumes the second run_dir for M more. Resuming must give the same
per-step losses and the same final HF checkpoint as training straight through (fp32 tolerance):
per-rank optimizer state, scheduler, RNG and the step counter all have to come back.
This file is also the torchrun worker (`python tests/test_megatron_resume.py --worker ...`).
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

N, M = 2, 2  # steps before the stop, steps after the resume


def write_sft_data(path: Path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"count to {i + 3}"},
                {"role": "assistant", "content": " ".join(str(j) for j in range(i + 3))},
            ]
        }
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(model: str, data: Path, run_dir: Path, tensor: int, pipeline: int, expert: int, **overrides):
    from flywheel.trainer.config import TrainConfig

    # 4 samples of ~30 tokens, micro-batches of 64 tokens: every step accumulates over 2 micro-batches
    settings = dict(
        model=model,
        data=[str(data)],
        run_dir=run_dir,
        backend="megatron",
        objective="sft",
        max_seq_len=64,
        micro_batch_tokens=64,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        max_steps=N + M,
        save_every=N,
        seed=3,
        weight_decay=0.01,
        parallel={"tensor": tensor, "pipeline": pipeline, "expert": expert},
    )
    return TrainConfig(**(settings | overrides))


def _worker(phase: str, model: str, data: Path, root: Path, tensor: int, pipeline: int, expert: int) -> None:
    from flywheel.trainer.train import train

    if phase == "first":
        train(train_config(model, data, root / "straight", tensor, pipeline, expert))
        train(train_config(model, data, root / "split", tensor, pipeline, expert, stop_after=N))
    else:
        train(train_config(model, data, root / "split", tensor, pipeline, expert, resume=True))


def torchrun(
    phase: str, model: Path, data: Path, root: Path, tensor: int, pipeline: int, expert: int, check: bool = True
) -> subprocess.CompletedProcess:
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
        phase,
        str(model),
        str(data),
        str(root),
        str(tensor),
        str(pipeline),
        str(expert),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def hf_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_resume_matches_straight(root: Path, ranks: int = 2) -> None:
    straight, split = losses(root / "straight"), losses(root / "split")
    assert [s for s, _ in straight] == [s for s, _ in split] == list(range(1, N + M + 1))
    # a resume that lost the Adam moments, the LR schedule position or the data cursor moves these
    assert max(abs(a - b) for (_, a), (_, b) in zip(straight, split)) < 1e-5, (straight, split)
    final = f"step_{N + M:06d}"
    for run in ("straight", "split"):
        state = root / run / "checkpoints" / final / "trainer_state"
        assert sorted(p.name for p in state.glob("rank*.pt")) == [f"rank{r}.pt" for r in range(ranks)]
        assert json.loads((state / "state.json").read_text())["step"] == N + M
    a, b = hf_weights(root / "straight" / "checkpoints" / final), hf_weights(root / "split" / "checkpoints" / final)
    assert set(a) == set(b) and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), f"{name}: {(a[name] - b[name]).abs().max():.3g}"
    # and training moved the weights (the comparison is not between two untouched copies)
    start = hf_weights(root / "split" / "checkpoints" / f"step_{N:06d}")
    assert any(not torch.equal(a[k], start[k]) for k in a)


@pytest.mark.slow  # two torchrun launches of 2 ranks: ~110 s on the shared 2-core machine
@pytest.mark.parametrize(
    "which,tensor,pipeline,expert", [("tiny-qwen3", 2, 1, 1), ("tiny-qwen3-moe", 1, 1, 2)], ids=["tp2-dense", "ep2-moe"]
)
def test_resume_under_torchrun_matches_straight_run(which, tensor, pipeline, expert, tmp_path):
    from flywheel.server.models import resolve_model

    model = Path(resolve_model(which))
    data = write_sft_data(tmp_path / "sft.jsonl")
    torchrun("first", model, data, tmp_path, tensor, pipeline, expert)
    assert len(losses(tmp_path / "split")) == N
    if tensor == 2:  # same world size, other TP degree: every rank{r}.pt exists, but holds another shard
        refused = torchrun("resume", model, data, tmp_path, 1, pipeline, expert, check=False)
        assert refused.returncode != 0 and "this run changes tensor 2 -> 1" in refused.stderr, refused.stderr[-4000:]
        assert len(losses(tmp_path / "split")) == N  # nothing was trained
    torchrun("resume", model, data, tmp_path, tensor, pipeline, expert)
    assert_resume_matches_straight(tmp_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--worker", nargs=7, metavar=("PHASE", "MODEL", "DATA", "ROOT", "TP", "PP", "EP"), required=True
    )
    a = parser.parse_args().worker
    _worker(a[0], a[1], Path(a[2]), Path(a[3]), int(a[4]), int(a[5]), int(a[6]))
