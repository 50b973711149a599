"""The training recipe on the real tiny Qwen3: packing, accumulation, SFT, DPO, checkpoints, resume,
plots, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.server.errors import UserError
from flywheel.trainer.backend import build_policy
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.data import collate, load_sft
from flywheel.trainer.objectives import nll_backward
from flywheel.trainer.policy_interface import IGNORE, PolicyConfig
from flywheel.trainer.train import train


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n=8):
    return [
        {
            "messages": [
                {"role": "user", "content": f"count to {i + 3}"},
                {"role": "assistant", "content": " ".join(str(j) for j in range(i + 3))},
            ]
        }
        for i in range(n)
    ]


def make_config(tmp_path, tiny_model, **overrides) -> TrainConfig:
    values = dict(
        model=str(tiny_model),
        run_dir=tmp_path / "run",
        max_seq_len=64,
        micro_batch_tokens=128,
        batch_size=4,
        lr=3e-3,
        warmup_steps=0,
        save_every=0,
        max_steps=4,
        seed=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def policy(tiny_model):
    return build_policy(PolicyConfig(model=str(tiny_model)))


def test_packed_rows_give_the_same_logprobs_as_separate_sequences(policy):
    torch.manual_seed(0)
    a, b = torch.randint(0, 5000, (6,)), torch.randint(0, 5000, (9,))

    def alone(x):
        targets = torch.cat([x[1:], torch.tensor([IGNORE])]).unsqueeze(0)
        return policy.forward_logprobs(x.unsqueeze(0), torch.arange(len(x)).unsqueeze(0), targets)[0, :-1]

    with torch.no_grad():
        packed_ids = torch.cat([a, b]).unsqueeze(0)
        positions = torch.cat([torch.arange(6), torch.arange(9)]).unsqueeze(0)
        targets = torch.cat([a[1:], torch.tensor([IGNORE]), b[1:], torch.tensor([IGNORE])]).unsqueeze(0)
        packed = policy.forward_logprobs(packed_ids, positions, targets)[0]
        torch.testing.assert_close(packed[:5], alone(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[6:14], alone(b), atol=1e-5, rtol=0)
        # without the position restart the second document would see the first: the values differ
        leaky = policy.forward_logprobs(packed_ids, torch.arange(15).unsqueeze(0), targets)[0]
        assert (leaky[6:14] - alone(b)).abs().max() > 1e-3


def test_gradient_accumulation_equals_one_big_batch(policy, tmp_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    samples = load_sft(write_jsonl(tmp_path / "sft.jsonl", sft_rows(4)), tokenizer, max_len=64)

    def grads(budget, pack):
        config = make_config(tmp_path, tiny_model, data=["unused.jsonl"], micro_batch_tokens=budget, pack=pack)
        policy.model.zero_grad()
        out = nll_backward(policy, samples, config, pad_id=0)
        return out["loss"], [p.grad.clone() for p in policy.parameters()]

    big_loss, big = grads(1024, True)
    small_loss, small = grads(64, True)  # several micro-batches
    padded_loss, padded = grads(1024, False)  # one padded row per sample
    policy.model.zero_grad()
    assert small_loss == pytest.approx(big_loss, rel=1e-5) and padded_loss == pytest.approx(big_loss, rel=1e-5)
    for g_big, g_small, g_pad in zip(big, small, padded):
        torch.testing.assert_close(g_small, g_big, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(g_pad, g_big, atol=1e-6, rtol=1e-4)


def test_sft_lowers_loss_and_saves_a_loadable_hf_folder(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    config = make_config(tmp_path, tiny_model, data=[str(data)], max_steps=8)
    state = train(config)
    rows = metrics(config.run_dir)
    assert state.step == 8 and [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    ckpt = config.run_dir / "checkpoints" / "step_000008"
    assert (config.run_dir / "checkpoints" / "latest").read_text() == ckpt.name
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (ckpt / name).exists(), name
    # the folder is a plain HF model that scores the training data better than the start did
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    batch = collate(load_sft(data, tokenizer, 64), pad_id=0)

    def loss_of(path):
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        return torch.nn.functional.cross_entropy(logits[0], batch.targets[0], ignore_index=IGNORE).item()

    assert loss_of(ckpt) < loss_of(tiny_model) - 1.0
    assert (config.run_dir / "tensorboard").is_dir() and any((config.run_dir / "tensorboard").iterdir())


def test_resume_continues_exactly(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(6))  # 6 samples, batch 4: epochs wrap mid-run
    common = dict(data=[str(data)], max_steps=6, warmup_steps=2, weight_decay=0.01)
    straight = make_config(tmp_path / "a", tiny_model, **common)
    train(straight)
    split = make_config(tmp_path / "b", tiny_model, stop_after=3, **common)
    first = train(split)
    assert first.step == 3
    with pytest.raises(UserError, match="already holds checkpoints; pass --resume"):
        train(split)
    # optimizer state written by one backend / parallel layout is not loaded into another
    with pytest.raises(UserError, match="this run changes backend transformers -> megatron"):
        train(split.model_copy(update={"resume": True, "stop_after": None, "backend": "megatron"}))
    resumed = train(split.model_copy(update={"resume": True, "stop_after": None}))
    assert resumed.step == 6
    a = load_file(straight.run_dir / "checkpoints" / "step_000006" / "model.safetensors")
    b = load_file(split.run_dir / "checkpoints" / "step_000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)
    # the resumed half logged the same losses the straight run did
    la = [r["loss"] for r in metrics(straight.run_dir)]
    lb = [r["loss"] for r in metrics(split.run_dir)]
    assert lb == pytest.approx(la, rel=1e-5)


def test_dpo_on_a_synthetic_preference_lowers_loss_and_raises_margin(tmp_path, tiny_model):
    rows = [{"prompt": f"question {i}: agree?", "chosen": "yes yes yes", "rejected": "no, I do not"} for i in range(8)]
    data = write_jsonl(tmp_path / "dpo.jsonl", rows)
    config = make_config(
        tmp_path, tiny_model, objective="dpo", data=[str(data)], max_steps=8, lr=2e-3, dpo={"beta": 0.5}
    )
    train(config)
    rows = metrics(config.run_dir)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: -log sigmoid(0)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    assert rows[-1]["margin_mean"] > rows[0]["margin_mean"] + 0.5
    assert rows[-1]["accuracy"] == 1.0
    assert (config.run_dir / "dpo_reference.pt").exists()  # computed once from the start weights, cached


def test_plot_writes_png_curves(tmp_path, tiny_model):
    from flywheel.trainer.plot import plot_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 1.0 / s, "reward_mean": s / 10, "kl": 0.01 * s, "lr": 1e-3}) + "\n"
            for s in range(1, 6)
        )
    )
    paths = plot_run(run_dir)
    assert {p.name for p in paths} == {"loss.png", "reward.png", "kl.png", "optim.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_cli_reports_bad_data_in_one_line(tmp_path, tiny_model, capsys):
    from flywheel.clients.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": sft_rows(1)[0]["messages"]}) + "\n" + json.dumps({"text": "x"}) + "\n")
    assert (
        main(
            [
                "train",
                "--objective",
                "sft",
                "--model",
                str(tiny_model),
                "--data",
                str(bad),
                "--run-dir",
                str(tmp_path / "run"),
                "--max-seq-len",
                "64",
                "--micro-batch-tokens",
                "128",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err  # transformers' loading bar comes first
    message = err[err.find("flywheel train: error: ") :].removesuffix("\n")
    assert message.startswith("flywheel train: error: ") and "bad.jsonl:2" in message and "\n" not in message
    assert main(["train", "--objective", "sft", "--run-dir", str(tmp_path / "r2")]) == 2  # neither data nor queue
