"""Adapter-only pushes into a live server (issue 20 item 2): the LoRA trainer's adapter is served as
`policy` beside the base model, equal to the learner's base + adapter; bad adapters are refused with
the previous one still serving; a second push replaces the adapter in place and the version advances."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from flywheel.clients.servers import start_server
from flywheel.server.weights.client import PushFailed, push_adapter
from flywheel.trainer.backend import build_policy
from flywheel.trainer.checkpoint import latest_checkpoint
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.train import train
from tests.test_lora import config

PROMPTS = ["The capital of France is", " Areatusatusatus", "1 2 3 4"]


def served(url: str, model: str) -> list[tuple[list[int], list[int], list[float]]]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    out = []
    for prompt in PROMPTS:
        c = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            logprobs=1,
            extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
        ).choices[0]
        out.append((c.prompt_token_ids, c.model_extra["token_ids"], c.logprobs.token_logprobs))
    return out


def learner_logprobs(model, prompt_ids: list[int], ids: list[int]) -> list[float]:
    full = torch.tensor([prompt_ids + ids], device=model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].float(), -1)
    start = len(prompt_ids)
    return [float(logp[start + i - 1, t]) for i, t in enumerate(ids)]


# The CPU server computes LoRA in fp32: it matches the fp32 learner to 2e-3. vLLM's CUDA LoRA kernels
# (punica, Triton) multiply fp32 inputs in TF32 (tl.dot's default, ~10 mantissa bits): on the H200 the
# served adapter was 0.030 nats from the fp32 learner while the base model (cuBLAS, no TF32) matched, so
# on a GPU the bound is looser, and every check also asks that the served answers be far from the
# other weights (see test below), which a wrong or missing adapter would not be.
TOL = 5e-2 if torch.cuda.is_available() else 2e-3


def logprob_gap(url: str, name: str, model) -> float:
    """Largest |served - learner| logprob over the prompts' greedy tokens."""
    gaps = []
    for prompt_ids, ids, lps in served(url, name):
        mine = learner_logprobs(model, prompt_ids, ids)
        gaps.append(max(abs(a - b) for a, b in zip(mine, lps)))
    print(f"{name}: served vs learner logprob gap {max(gaps):.2e}")
    return max(gaps)


def assert_serves(url: str, name: str, model, tol=TOL):
    assert logprob_gap(url, name, model) <= tol, name


def lora_run(tmp_path, tiny_model, name: str, steps: int, lr: float) -> TrainConfig:
    """tests/test_lora.py's LoRA SFT run in its own folder, trained `steps` steps with one checkpoint."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = config(folder, tiny_model, lr=lr, save_every=steps, max_steps=steps)
    train(cfg)
    return cfg


def test_adapter_push_serves_base_and_adapter_side_by_side(tmp_path, tiny_model):
    run_a = lora_run(tmp_path, tiny_model, "a", steps=3, lr=5e-2)
    policy_a = build_policy(run_a.policy_config(latest_checkpoint(run_a.run_dir)))
    base = build_policy(run_a.model_copy(update={"lora_rank": 0}).policy_config()).model.eval()
    tensors_a, config_a = policy_a.adapter_state()
    with start_server(tiny_model, tmp_path / "srv", max_lora_rank=8) as srv:
        answer = push_adapter(srv.url, tensors_a, config_a, 1, srv.admin_token, source="test")
        assert answer["version"] == 1 and answer["adapter"] == "policy" and answer["rank"] == 4
        names = {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert names == {srv.model, "policy"}
        assert_serves(srv.url, "policy", policy_a.model.eval())
        assert_serves(srv.url, srv.model, base)
        assert served(srv.url, "policy") != served(srv.url, srv.model)  # the adapter does change the answers
        assert logprob_gap(srv.url, "policy", base) > 10 * TOL  # and by far more than the bound

        # bad adapters: refused, version 1 keeps serving exactly as before
        bad = {k: v.clone() for k, v in tensors_a.items()}
        first_a = next(k for k in bad if "lora_A" in k)
        nan = dict(bad, **{first_a: torch.full_like(bad[first_a], float("nan"))})
        wrong_rank = dict(bad, **{first_a: torch.zeros(2, bad[first_a].shape[1])})
        missing_b = {k: v for k, v in bad.items() if k != first_a.replace("lora_A", "lora_B")}
        too_big = dict(config_a, r=16)
        for tensors, config, needle in (
            (nan, config_a, "NaN"),
            (wrong_rank, config_a, "do not fit"),
            (missing_b, config_a, "lacks lora_B"),
            (bad, too_big, "rank 16"),
        ):
            with pytest.raises(PushFailed) as refused:
                push_adapter(srv.url, tensors, config, 2, srv.admin_token)
            assert refused.value.status == 400 and needle in refused.value.message
        with pytest.raises(PushFailed) as stale:
            push_adapter(srv.url, tensors_a, config_a, 1, srv.admin_token)
        assert stale.value.status == 409
        unauthorised = httpx.post(srv.url + "/flywheel/admin/weights/adapter", json={"version": 2, "path": "/tmp"})
        assert unauthorised.status_code == 401
        assert httpx.get(srv.url + "/flywheel/status").json()["policy_version"] == 1
        assert_serves(srv.url, "policy", policy_a.model.eval())

        # a newer adapter replaces the old one in place (same name, no stale prefix cache)
        run_b = lora_run(tmp_path, tiny_model, "b", steps=3, lr=8e-2)
        policy_b = build_policy(run_b.policy_config(latest_checkpoint(run_b.run_dir)))
        tensors_b, config_b = policy_b.adapter_state()
        resp = httpx.post(srv.url + "/v1/completions", json={"model": "policy", "prompt": PROMPTS[0], "max_tokens": 4})
        assert resp.headers["x-flywheel-policy-version"] == "1"
        assert push_adapter(srv.url, tensors_b, config_b, 2, srv.admin_token)["version"] == 2
        assert_serves(srv.url, "policy", policy_b.model.eval())
        assert_serves(srv.url, srv.model, base)
        owned = sorted(p.name for p in (tmp_path / "srv" / "data" / "adapters").iterdir())
        assert owned == ["v2"]  # the server keeps only the adapter it serves
