"""LoRA on the transformers backend (issue 20): only the adapter trains, checkpoints hold the merged
weights (they serve like a full model) plus adapter/, a resume continues the adapter, and
`flywheel train merge` gives the same model as base + adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flywheel.server.errors import UserError
from flywheel.trainer.backend import build_policy
from flywheel.trainer.checkpoint import latest_checkpoint
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.train import train
from tests.test_trainer import make_config, sft_rows, write_jsonl


def config(tmp_path, tiny_model, **overrides) -> TrainConfig:
    """tests/test_trainer.py's tiny SFT run, as a rank-4 LoRA run that checkpoints every 2 steps."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    return make_config(
        tmp_path, tiny_model, **{"data": [str(data)], "lr": 1e-2, "save_every": 2, "lora_rank": 4, **overrides}
    )


def merge(adapter, tiny_model, out) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "flywheel.clients.cli",
        "train",
        "merge",
        "--adapter",
        str(adapter),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0].tolist()


def test_lora_trains_only_the_adapter_and_the_checkpoint_serves_merged(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model)
    policy = build_policy(cfg.policy_config())
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = load_file(next(tiny_model.glob("*.safetensors")))
    start = policy.state_dict_hf()  # B = 0: the fresh adapter changes nothing
    assert all(torch.equal(start[k], base[k].to(start[k].dtype)) for k in start if k in base)

    state = train(cfg)
    assert state.step == 4
    ckpt = latest_checkpoint(cfg.run_dir)
    merged = load_file(next(ckpt.glob("model*.safetensors")))
    changed = {k for k in merged if k in base and not torch.allclose(merged[k], base[k].to(merged[k].dtype))}
    assert changed and all(k.split(".")[-2] in cfg.lora_targets for k in changed), sorted(changed)[:5]
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert sum(t.numel() for t in adapter.values()) < 0.5 * sum(t.numel() for t in base.values())

    # the merged checkpoint is a plain HF model with the same outputs as base + adapter
    served = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    resumed = build_policy(cfg.policy_config(ckpt))  # base + the checkpoint's adapter
    ids = torch.tensor([[8713, 1000, 42, 7, 99, 1000]])
    with torch.no_grad():
        a = torch.log_softmax(served(ids).logits, -1)
        b = torch.log_softmax(resumed.model(ids).logits, -1)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_lora_resume_continues_the_adapter(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, max_steps=6, stop_after=2)
    train(cfg)
    first = latest_checkpoint(cfg.run_dir)
    adapter_at_2 = load_file(first / "adapter" / "adapter_model.safetensors")
    train(cfg.model_copy(update={"resume": True, "stop_after": None}))
    last = latest_checkpoint(cfg.run_dir)
    assert last.name == "step_000006"
    adapter_at_6 = load_file(last / "adapter" / "adapter_model.safetensors")
    assert set(adapter_at_6) == set(adapter_at_2)
    assert any(not torch.equal(adapter_at_6[k], adapter_at_2[k]) for k in adapter_at_2)
    losses = [json.loads(line)["loss"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_merge_cli_equals_base_plus_adapter(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, max_steps=2)
    train(cfg)
    ckpt = latest_checkpoint(cfg.run_dir)
    out = tmp_path / "merged"
    proc = merge(ckpt / "adapter", tiny_model, out)
    assert proc.returncode == 0, proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with_adapter = build_policy(cfg.policy_config(ckpt)).model
    ids = [8713, 1000, 1000, 1000]
    assert greedy(merged, ids) == greedy(with_adapter, ids)
    again = merge(ckpt / "adapter", tiny_model, out)
    assert again.returncode == 2 and "exists" in again.stderr.strip().splitlines()[-1]


def test_lora_refusals(tmp_path, tiny_model):
    with pytest.raises(UserError, match="not modules of this model"):
        build_policy(config(tmp_path, tiny_model, lora_targets=["nope_proj"]).policy_config())
    with pytest.raises(UserError, match="megatron"):
        build_policy(config(tmp_path, tiny_model, backend="megatron").policy_config())
