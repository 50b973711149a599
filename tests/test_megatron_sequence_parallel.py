"""MoE + TP=2 trains TE-free through sequence parallelism (trainer/megatron/sequence_parallel.py), on CPU
(torchrun + gloo), checked against the transformers backend on a batch whose length (15) is not a
multiple of TP (the policy pads it): log-probs, loss, every gradient and the clip norm.
(tests/test_megatron.py checks the TP=2 MoE logits and an even-length batch.)
This file is also the torchrun worker (`python tests/test_megatron_sequence_parallel.py --worker ...`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel.server.net import free_port as _free_port  # noqa: E402  (one free-port helper for every launcher)
from flywheel.trainer.policy_interface import ParallelConfig, PolicyConfig  # noqa: E402
from tests.test_megatron import assert_grads_close, make_batch, nll  # noqa: E402

T = 15  # odd: sequence parallelism splits T over 2 ranks, so the policy must pad


def odd_batch():
    ids, pos, targets = make_batch()
    return ids[:, :T], pos[:, :T], targets[:, :T]


def step(policy) -> dict:
    ids, pos, targets = odd_batch()
    lp = policy.forward_logprobs(ids, pos, targets)
    loss = nll(lp, targets)
    loss.backward()
    policy.finalize_grads()
    return {"logprobs": lp.detach(), "loss": loss.detach()}


def _worker(model_path: str, out: Path) -> None:
    import torch.distributed as dist

    from flywheel.trainer.megatron import build_policy

    policy = build_policy(PolicyConfig(backend="megatron", model=model_path, parallel=ParallelConfig(tensor=2)))
    assert policy.model.config.sequence_parallel
    got = step(policy)
    got["grads"] = policy.grads_hf()
    got["norm"] = policy.clip_grad_norm(1e9)
    if dist.get_rank() == 0:
        torch.save(got, out)
    dist.barrier()


def test_moe_with_tp2_trains_through_sequence_parallelism_without_te(tiny_moe_model, tmp_path):
    from flywheel.trainer.hf_backend import HFPolicy

    out = tmp_path / "rank0.pt"
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
        str(tiny_moe_model),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out, weights_only=False)
    hf = HFPolicy(PolicyConfig(backend="transformers", model=str(tiny_moe_model)))
    ref = step(hf)
    ref_grads = {n: p.grad for n, p in hf.model.named_parameters() if p.grad is not None}
    assert got["logprobs"].shape == ref["logprobs"].shape == (2, T)
    assert (got["logprobs"] - ref["logprobs"]).abs().max() < 1e-5
    assert abs(float(got["loss"] - ref["loss"])) < 1e-5
    assert_grads_close(got["grads"], ref_grads)
    hf_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in ref_grads.values())))
    assert abs(got["norm"] - hf_norm) < 1e-4 * hf_norm


if __name__ == "__main__":
    _worker(sys.argv[sys.argv.index("--worker") + 1], Path(sys.argv[sys.argv.index("--worker") + 2]))
