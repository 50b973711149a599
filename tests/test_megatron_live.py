"""The megatron learner in the live loop: GRPO from the Redis rollout queue, weights pushed into a running
`flywheel serve`, and the server then answers as the megatron model itself does.

Each test puts four groups of rollouts (sampled from the base model with HF generate) on the real
queue, trains 2 GRPO steps on `backend: megatron` (push at step 2: the HF-layout weights are
gathered from megatron in memory and pushed; no checkpoint folder is read), then checks
- the server's version advanced by one and every record is acked;
- the server's greedy tokens and their logprobs equal those of a megatron model built from the
  trained weights (the run's final checkpoint, the same tensors it pushed) within fp32 tolerance,
  and differ from the base model's (so the push really changed what is served).
World size 1 runs in-process; TP=2 (tiny Qwen3) and EP=2 (tiny Qwen3-MoE, whose stacked experts are
pushed under the checkpoint's per-expert names) run `flywheel train` under torchrun over gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from flywheel.clients.servers import start_server
from flywheel.sampler.config import QueueConfig
from flywheel.sampler.queue import RolloutQueue
from flywheel.server.net import free_port
from flywheel.trainer.backend import build_policy
from flywheel.trainer.checkpoint import latest_checkpoint
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.policy_interface import PolicyConfig
from tests.test_trainer_grpo import PROMPT, sample_records

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [PROMPT, [785, 3974, 13876, 38835], [9707, 11, 1879]]
NEW_TOKENS = 8
LOGPROB_TOL = 1e-3  # vLLM's CPU kernels vs megatron's, both fp32 (measured: a few 1e-5)


@pytest.fixture(scope="module")
def megatron_world():
    from flywheel.trainer.megatron.parallel import shutdown

    yield
    shutdown()


@pytest.fixture(scope="module")
def dense_server(tiny_model):
    # vLLM's ZMQ socket paths live under the server's data dir and must stay < 108 characters
    workdir = Path(tempfile.mkdtemp(prefix="fwmeg", dir="/tmp"))
    with start_server(tiny_model, workdir) as server:
        yield server
    shutil.rmtree(workdir, ignore_errors=True)


def served_version(server) -> int:
    return httpx.get(server.url + "/flywheel/status", timeout=10).json()["policy_version"]


def served_greedy(server) -> list[tuple[list[int], list[float]]]:
    out = []
    for prompt in PROMPTS:
        reply = httpx.post(
            server.base_url + "/completions",
            timeout=60,
            json={
                "model": server.model,
                "prompt": prompt,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "logprobs": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
        choice = reply.json()["choices"][0]
        out.append((choice["token_ids"], choice["logprobs"]["token_logprobs"]))
    return out


def megatron_greedy(model_dir: Path) -> list[tuple[list[int], list[float]]]:
    """Greedy decoding by a world-size-1 megatron GPTModel loaded from `model_dir`: tokens and their logprobs."""
    policy = build_policy(PolicyConfig(backend="megatron", model=str(model_dir)))
    policy.train(False)
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids, logprobs = list(prompt), []
            for _ in range(NEW_TOKENS):
                x = torch.tensor([ids])
                logits = policy.model(x, torch.arange(len(ids))[None], None)[0, -1].float()
                token = int(logits.argmax())
                logprobs.append(float(logits.log_softmax(-1)[token]))
                ids.append(token)
            out.append((ids[len(prompt) :], logprobs))
    return out


def assert_served_equals(served, ours) -> float:
    """Same greedy tokens, logprobs within LOGPROB_TOL; returns the largest logprob gap."""
    gap = 0.0
    for (ids_a, lp_a), (ids_b, lp_b) in zip(served, ours, strict=True):
        assert ids_a == ids_b, f"served {ids_a} != megatron {ids_b}"
        gap = max(gap, max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)))
    assert gap < LOGPROB_TOL, f"logprobs differ by {gap}"
    return gap


def logprob_gap(a, b) -> float:
    return max(abs(x - y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))


def fill_queue(redis_url: str, model: Path) -> list[str]:
    records = sample_records(build_policy(PolicyConfig(model=str(model))), groups=4, group_size=4)  # 2 steps of 8
    for i, r in enumerate(records):  # mixed rewards in every group (the MoE model never emits TARGET): a gradient
        r.reward = float(i % 2)
    RolloutQueue(QueueConfig(url=redis_url)).put(records)
    return [r.id for r in records]


def live_config(tmp_path, model: Path, redis_url: str, server, **overrides) -> TrainConfig:
    values = dict(
        objective="grpo",
        backend="megatron",
        model=str(model),
        run_dir=tmp_path / "run",
        lr=2e-2,  # large: two steps must move the greedy logprobs far beyond the fp32 tolerance
        warmup_steps=0,
        max_seq_len=32,
        micro_batch_tokens=128,
        batch_size=8,
        max_steps=2,
        save_every=2,
        push_every=2,
        push_url=server.base_url,
        admin_token=server.admin_token,
        queue={"url": redis_url, "claim_idle_s": 5.0},
        queue_input={"block_s": 0.2, "max_wait_s": 60},
        grpo={"group_size": 4},
    )
    values.update(overrides)
    return TrainConfig(**values)


def check_trained_and_served(config: TrainConfig, server, redis_url: str, version_before: int, base) -> None:
    assert served_version(server) == version_before + 1
    stats = RolloutQueue(QueueConfig(url=redis_url)).stats()
    assert stats["pending"] == 0 and stats["lag"] == 0  # acked, after the checkpoint of their step
    trained = latest_checkpoint(config.run_dir)
    assert trained is not None and trained.name == "step_000002"
    served = served_greedy(server)
    assert_served_equals(served, megatron_greedy(trained))
    assert logprob_gap(served, base) > 20 * LOGPROB_TOL  # the server no longer serves the base weights


def push_entries(weights: dict) -> list:
    """A state dict as the push protocol's entries (name, safetensors dtype, shape, bytes, where)."""
    from flywheel.server.weights.protocol import TORCH_DTYPES

    out = []
    for name, t in weights.items():
        dtype, itemsize = TORCH_DTYPES[str(t.dtype).removeprefix("torch.")]
        out.append((name, dtype, tuple(t.shape), t.numel() * itemsize, "test"))
    return out


def test_pushed_moe_weights_use_the_served_checkpoints_per_expert_names(tiny_moe_model, megatron_world):
    """transformers (and megatron's HF conversion) stack the experts in memory; the served checkpoint keeps
    one tensor per expert: the stacked dict is refused as the server refuses it (400), checkpoint_layout's
    is accepted and holds the checkpoint's exact tensors."""
    from safetensors.torch import load_file

    from flywheel.server.weights.protocol import PushError, checkpoint_manifest, validate_tensors
    from flywheel.trainer.push import checkpoint_layout

    manifest = checkpoint_manifest(tiny_moe_model)
    stacked = build_policy(PolicyConfig(backend="megatron", model=str(tiny_moe_model))).state_dict_hf()
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in stacked)
    with pytest.raises(PushError) as refused:
        validate_tensors(push_entries(stacked), manifest)
    assert refused.value.status == 400
    pushed = checkpoint_layout(stacked)
    assert validate_tensors(push_entries(pushed), manifest)["tensors"] == len(manifest)
    on_disk = {k: v for f in tiny_moe_model.glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(torch.equal(pushed[k], on_disk[k]) for k in on_disk)


def _broadcast_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from flywheel.trainer.ranks import from_main_rank, is_main_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mine = {"version": 7, "names": ["a", "é"]} if rank == 0 else {"version": -1}
    got = [from_main_rank(mine), from_main_rank(None if rank else 3), is_main_rank()]
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


def test_from_main_rank_gives_every_rank_rank_0s_value(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_broadcast_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == [{"version": 7, "names": ["a", "é"]}, 3, True]
    assert got[1] == [{"version": 7, "names": ["a", "é"]}, 3, False]


def test_megatron_grpo_from_the_queue_pushes_live_at_world_size_1(
    tmp_path, tiny_model, dense_server, redis_client, redis_url, megatron_world
):
    from flywheel.trainer.train import train

    base = megatron_greedy(tiny_model)
    before = served_version(dense_server)
    if before == 0:  # a fresh server serves the base weights: the megatron conversion of them agrees
        assert_served_equals(served_greedy(dense_server), base)
    ids = fill_queue(redis_url, tiny_model)
    config = live_config(tmp_path, tiny_model, redis_url, dense_server)
    state = train(config)
    assert state.step == 2 and state.pushed_version == before + 1
    assert sorted(state.trained_ids) == sorted(ids)
    check_trained_and_served(config, dense_server, redis_url, before, base)


def torchrun_train(config: TrainConfig, tmp_path: Path) -> None:
    """`flywheel train --config FILE` as two torchrun ranks over gloo."""
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "flywheel.clients.cli",
        "train",
        "--config",
        str(config_file),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow  # two torchrun ranks (~1 min) on top of the server
def test_megatron_tp2_grpo_from_the_queue_pushes_live(
    tmp_path, tiny_model, dense_server, redis_client, redis_url, megatron_world
):
    base = megatron_greedy(tiny_model)
    before = served_version(dense_server)
    fill_queue(redis_url, tiny_model)
    config = live_config(tmp_path, tiny_model, redis_url, dense_server, parallel={"tensor": 2})
    torchrun_train(config, tmp_path)
    check_trained_and_served(config, dense_server, redis_url, before, base)


@pytest.mark.slow  # its own MoE server (~1 min) and two torchrun ranks
def test_megatron_ep2_moe_grpo_from_the_queue_pushes_live(
    tmp_path, tiny_moe_model, redis_client, redis_url, megatron_world
):
    base = megatron_greedy(tiny_moe_model)
    fill_queue(redis_url, tiny_moe_model)
    workdir = Path(tempfile.mkdtemp(prefix="fwmoe", dir="/tmp"))
    try:
        with start_server(tiny_moe_model, workdir) as server:
            assert_served_equals(served_greedy(server), base)
            config = live_config(tmp_path, tiny_moe_model, redis_url, server, parallel={"expert": 2})
            torchrun_train(config, tmp_path)
            check_trained_and_served(config, server, redis_url, 0, base)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
