"""The megatron backend against the transformers backend, on the bundled tiny models (CPU, fp32).

- conversion HF -> megatron -> HF is bit-exact; `flywheel train convert` round-trips a TP=2 / EP=2 folder
- megatron logits equal HF logits (dense with tied embeddings, MoE, Llama), both layer-spec variants
- the same batch (with a packed row) and weights give the same per-token log-probs, loss and
  gradients on `backend: transformers` and `backend: megatron`, at world size 1 and, through
  torchrun + gloo, with TP=2 (dense), EP=2 (MoE) and TP=2 (MoE, sequence-parallel); save_hf writes a
  folder HF reloads exactly
- SFT through trainer.train with backend megatron gives the transformers backend's losses step by step
This file is also the torchrun worker (`python tests/test_megatron.py --worker ...`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel.server.net import free_port as _free_port  # noqa: E402  (one free-port helper for every launcher)
from flywheel.trainer.megatron.policy import document_mask  # noqa: E402
from flywheel.trainer.policy_interface import IGNORE, ParallelConfig, PolicyConfig  # noqa: E402


def make_batch(vocab: int = 150000, packed: bool = True):
    """2 rows of 16 tokens; packed: row 1 holds two documents (positions restart at 7)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    second = torch.cat([torch.arange(7), torch.arange(9)]) if packed else torch.arange(16)
    pos = torch.stack([torch.arange(16), second])
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE
    targets[1, 6 if packed else 5] = IGNORE  # end of the first packed document / a prompt-like position
    return ids, pos, targets


def nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logprobs.sum() / (targets != IGNORE).sum()


def run_step(policy):
    """One forward/backward; returns (logprobs, loss) with gradients left in the policy."""
    ids, pos, targets = make_batch()
    lp = policy.forward_logprobs(ids, pos, targets)
    loss = nll(lp, targets)
    loss.backward()
    policy.finalize_grads()
    return lp.detach(), loss.detach()


def hf_reference(path: Path):
    from flywheel.trainer.hf_backend import HFPolicy

    policy = HFPolicy(PolicyConfig(backend="transformers", model=str(path)))
    lp, loss = run_step(policy)
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    ids, pos, _ = make_batch()
    with torch.no_grad():
        # use_cache=False as HFPolicy calls it: only then does HF derive the packed-document mask
        logits = policy.model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return {
        "logprobs": lp,
        "loss": loss,
        "grads": grads,
        "logits": logits,
        "state": {k: v.detach().clone() for k, v in policy.model.state_dict().items()},
    }


def assert_grads_close(ours: dict, ref: dict, atol: float = 2e-5) -> None:
    for name, g in ref.items():
        assert name in ours, f"megatron has no gradient for {name}"
        assert torch.allclose(ours[name], g, atol=atol, rtol=1e-4), (
            f"{name}: max diff {(ours[name] - g).abs().max():.3g}"
        )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_model) -> Path:
    """A 2-layer Llama with tied embeddings (SmolLM2's architecture) on the Qwen tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / name).is_file():
            shutil.copy2(tiny_model / name, out / name)
    return out


@pytest.fixture(scope="module")
def megatron_world():
    """One in-process world of size 1 (gloo) for this module; torn down after."""
    from flywheel.trainer.megatron.parallel import shutdown

    yield
    shutdown()


def _models(request):
    return {
        "dense-tied": request.getfixturevalue("tiny_model"),
        "moe": request.getfixturevalue("tiny_moe_model"),
        "llama-tied": request.getfixturevalue("tiny_llama"),
    }


@pytest.mark.parametrize("which", ["dense-tied", "moe", "llama-tied"])
def test_backends_agree_at_world_size_1(which, request, megatron_world, tmp_path):
    from transformers import AutoModelForCausalLM

    from flywheel.trainer.megatron import build_policy

    path = _models(request)[which]
    ref = hf_reference(path)
    policy = build_policy(PolicyConfig(backend="megatron", model=str(path)))
    # the conversion is exact
    state = policy.state_dict_hf()
    expected = {
        k: v for k, v in ref["state"].items() if not (k == "lm_head.weight" and policy.arch.tie_word_embeddings)
    }
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # logits, log-probs (packed row included), loss and gradients
    ids, pos, _ = make_batch()
    with torch.no_grad():
        logits = policy.model(ids, pos, document_mask(pos))
    assert (logits - ref["logits"]).abs().max() < 1e-5
    lp, loss = run_step(policy)
    assert (lp - ref["logprobs"]).abs().max() < 1e-5
    assert abs(float(loss - ref["loss"])) < 1e-5
    assert_grads_close(policy.grads_hf(), ref["grads"])
    # clipping: the norm is the HF norm
    hf_norm = torch.sqrt(sum(g.pow(2).sum() for g in ref["grads"].values()))
    assert abs(policy.clip_grad_norm(1e9) - float(hf_norm)) < 1e-4 * float(hf_norm)
    # save_hf writes a folder transformers reloads to the same weights
    policy.save_hf(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.equal(reloaded[k], ref["state"][k]) for k in ref["state"])


def test_sft_training_gives_the_same_losses_on_both_backends(tiny_model, megatron_world, tmp_path):
    """`flywheel train --backend megatron`: same config, same losses step by step, an HF checkpoint."""
    import json

    from flywheel.trainer.config import TrainConfig
    from flywheel.trainer.train import train

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"count to {i + 3}"},
                {"role": "assistant", "content": " ".join(str(j) for j in range(i + 3))},
            ]
        }
        for i in range(8)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for backend in ("transformers", "megatron"):
        config = TrainConfig(
            model=str(tiny_model),
            run_dir=tmp_path / backend,
            data=[str(data)],
            max_seq_len=64,
            micro_batch_tokens=128,
            batch_size=4,
            lr=3e-3,
            warmup_steps=0,
            save_every=3,
            max_steps=3,
            seed=1,
            backend=backend,
        )
        train(config)
        losses[backend] = [
            json.loads(line)["loss"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()
        ]
    assert len(losses["megatron"]) == 3 and losses["megatron"][-1] < losses["megatron"][0]
    assert max(abs(a - b) for a, b in zip(losses["transformers"], losses["megatron"])) < 1e-4
    assert (tmp_path / "megatron" / "checkpoints" / "step_000003" / "config.json").is_file()


def test_packed_documents_are_isolated(tiny_model, megatron_world):
    """A document packed after another gives the log-probs it gives alone (position-id restart = boundary)."""
    from flywheel.trainer.megatron import build_policy

    policy = build_policy(PolicyConfig(backend="megatron", model=str(tiny_model)))
    ids, pos, targets = make_batch(packed=True)
    with torch.no_grad():
        packed = policy.forward_logprobs(ids, pos, targets)
        alone = policy.forward_logprobs(ids[1:, 7:], pos[1:, 7:], targets[1:, 7:])
        first = policy.forward_logprobs(ids[1:, :7], pos[1:, :7], targets[1:, :7])
    assert (packed[1, 7:] - alone[0]).abs().max() < 1e-5
    assert (packed[1, :7] - first[0]).abs().max() < 1e-5
    assert torch.all(packed[targets == IGNORE] == 0)


@pytest.mark.parametrize("attention,experts", [("sdpa", "grouped"), ("local", "sequential")])
def test_both_layer_specs_match_hf_logits(attention, experts, tiny_moe_model, megatron_world):
    from transformers import AutoModelForCausalLM

    from flywheel.trainer.megatron.convert import hf_state_dict, load_hf_state_dict
    from flywheel.trainer.megatron.model import arch_from_hf, build_gpt
    from flywheel.trainer.megatron.parallel import init_parallel

    init_parallel()
    hf = AutoModelForCausalLM.from_pretrained(tiny_moe_model).eval()
    arch = arch_from_hf(tiny_moe_model)
    model = build_gpt(arch, ParallelConfig(), attention=attention, experts=experts).eval()
    load_hf_state_dict(model, hf.state_dict(), arch)
    ids, pos, _ = make_batch()
    with torch.no_grad():
        assert (model(ids, pos, None) - hf(input_ids=ids).logits).abs().max() < 1e-5
    back = hf_state_dict(model, arch)
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_convert_cli_round_trip(tiny_moe_model, tmp_path):
    """`flywheel train convert` to an EP=2 megatron folder and back gives the same HF weights."""
    from safetensors.torch import load_file

    env = {**os.environ, "FLYWHEEL_HOME": os.environ.get("FLYWHEEL_HOME", str(REPO / ".flywheel"))}
    meg, back = tmp_path / "meg", tmp_path / "back"
    for args in (
        ["--src", str(tiny_moe_model), "--dst", str(meg), "--expert-parallel", "2"],
        ["--src", str(meg), "--dst", str(back), "--to", "hf"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "flywheel.clients.cli", "train", "convert", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (meg / "mp_rank_00_001" / "model_optim_rng.pt").is_file()
    original = {k: v for f in tiny_moe_model.glob("*.safetensors") for k, v in load_file(f).items()}
    converted = {k: v for f in back.glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "flywheel.clients.cli",
            "train",
            "convert",
            "--src",
            str(tmp_path),
            "--dst",
            str(tmp_path / "x"),
            "--to",
            "hf",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "not a megatron checkpoint folder" in bad.stderr


# ---------------------------------------------------------------- TP=2 / EP=2 through torchrun + gloo


def _worker(model: str, tensor: int, expert: int, out: Path) -> None:
    import torch.distributed as dist

    from flywheel.trainer.megatron import build_policy

    policy = build_policy(
        PolicyConfig(backend="megatron", model=model, parallel=ParallelConfig(tensor=tensor, expert=expert))
    )
    ids, pos, _ = make_batch()
    with torch.no_grad():
        logits = policy.model(ids, pos, document_mask(pos))
    if tensor > 1:  # vocab-parallel logits: gather the shards
        from megatron.core import parallel_state as ps

        parts = [torch.empty_like(logits) for _ in range(tensor)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    lp, loss = run_step(policy)
    grads = policy.grads_hf()
    norm = policy.clip_grad_norm(1e9)
    state = policy.state_dict_hf()
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "logprobs": lp, "loss": loss, "grads": grads, "norm": norm, "state": state}, out)
    dist.barrier()


@pytest.mark.parametrize("which,tensor,expert", [("dense-tied", 2, 1), ("moe", 1, 2), ("moe", 2, 1)])
def test_backends_agree_under_torchrun(which, tensor, expert, request, tmp_path):
    path = _models(request)[which]
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
        str(path),
        str(tensor),
        str(expert),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    ref = hf_reference(path)
    assert (got["logits"] - ref["logits"]).abs().max() < 1e-5
    assert (got["logprobs"] - ref["logprobs"]).abs().max() < 1e-5
    assert abs(float(got["loss"] - ref["loss"])) < 1e-5
    assert_grads_close(got["grads"], ref["grads"])
    hf_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in ref["grads"].values())))
    assert abs(got["norm"] - hf_norm) < 1e-4 * hf_norm
    assert all(torch.equal(got["state"][k], v) for k, v in ref["state"].items() if k in got["state"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "TP", "EP", "OUT"), required=True)
    a = parser.parse_args()
    _worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), Path(a.worker[3]))
