"""`compile: true` (regional torch.compile of every layer) trains the same numbers as eager, on both
backends, and survives a change of sequence length (the trainer's micro-batches vary)."""

from __future__ import annotations

import pytest
import torch

from flywheel.trainer.policy_interface import IGNORE, PolicyConfig


def batch(length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (2, length), generator=g)
    half = length // 2
    pos = torch.stack(
        [torch.arange(length), torch.cat([torch.arange(half), torch.arange(length - half)])]
    )  # row 1 packed
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE
    targets[1, half - 1] = IGNORE
    return ids, pos, targets


def step(policy, length: int, seed: int):
    ids, pos, targets = batch(length, seed)
    lp = policy.forward_logprobs(ids, pos, targets)
    (-lp.sum() / (targets != IGNORE).sum()).backward()
    policy.finalize_grads()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    return lp.detach(), grads


def build(backend: str, model, compile_: bool):
    config = PolicyConfig(backend=backend, model=str(model), compile=compile_)
    if backend == "megatron":
        from flywheel.trainer.megatron.policy import MegatronPolicy

        return MegatronPolicy(config)
    from flywheel.trainer.hf_backend import HFPolicy

    return HFPolicy(config)


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    from flywheel.trainer.megatron.parallel import shutdown

    shutdown()


@pytest.mark.parametrize("backend", ["megatron", pytest.param("transformers", marks=pytest.mark.slow)])
def test_compiled_layers_train_the_same_numbers_as_eager(backend, tiny_model, fresh_dynamo):
    eager = build(backend, tiny_model, compile_=False)
    reference = [step(eager, 16, 0), step(eager, 24, 1)]
    del eager
    compiled = build(backend, tiny_model, compile_=True)
    layer = compiled.model.decoder.layers[0] if backend == "megatron" else compiled.model.model.layers[0]
    assert layer._compiled_call_impl is not None  # the layer really goes through torch.compile
    for (lp_ref, grads_ref), (length, seed) in zip(reference, [(16, 0), (24, 1)]):
        lp, grads = step(compiled, length, seed)
        assert torch.allclose(lp, lp_ref, atol=1e-5), f"T={length}: logprobs differ by {(lp - lp_ref).abs().max():.3g}"
        assert grads.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            assert torch.allclose(grads[name], g, atol=2e-5, rtol=1e-4), (
                f"T={length} {name}: {(grads[name] - g).abs().max():.3g}"
            )
