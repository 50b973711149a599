"""MoE + TP=2 with sequence parallelism, TE-free, on CPU (torchrun + gloo): what megatron 0.16.1 needs
for MoE with tensor parallelism, checked against HF (trainer/megatron/sequence_parallel.py).

Training still refuses MoE + TP (MegatronPolicy) until model.py builds this configuration; this test
is the evidence that it can: log-probs, loss and every gradient equal HF's in fp32.
This file is also the torchrun worker (`python tests/test_megatron_sequence_parallel.py --worker ...`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_megatron import assert_grads_close, hf_reference, make_batch, nll  # noqa: E402


def _worker(model_path: str, out: Path) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_model import GPTModel
    from transformers import AutoModelForCausalLM

    from trainer.backend import ParallelConfig
    from trainer.megatron.convert import full_to_hf, gather_full, load_hf_state_dict
    from trainer.megatron.model import arch_from_hf, layer_specs, transformer_config
    from trainer.megatron.parallel import init_parallel
    from trainer.megatron.policy import _logprobs_from_logits, document_mask
    from trainer.megatron.sequence_parallel import sequence_parallel_grads_to_sum, use_sequence_parallel_norms

    parallel = ParallelConfig(tensor=2)
    init_parallel(parallel)
    ps.destroy_model_parallel()  # experts whole on every TP rank: expert_tensor_parallel_size=1
    ps.initialize_model_parallel(tensor_model_parallel_size=2, expert_tensor_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    arch = arch_from_hf(model_path)
    config = transformer_config(arch, parallel)
    config.sequence_parallel, config.expert_tensor_parallel_size = True, 1
    spec = layer_specs(config, attention="sdpa", experts="sequential")
    use_sequence_parallel_norms(spec)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=arch.vocab_size,
                     max_sequence_length=arch.max_position_embeddings, pre_process=True, post_process=True,
                     share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
                     rotary_base=arch.rope_theta, parallel_output=True)
    load_hf_state_dict(model, AutoModelForCausalLM.from_pretrained(model_path).state_dict(), arch)
    model.train()  # MoELayer's TP check applies in training mode only
    ids, pos, targets = make_batch()  # T=16: divisible by TP, as sequence parallelism needs
    lp = _logprobs_from_logits(model(ids, pos, document_mask(pos)), targets, 1.0)
    loss = nll(lp, targets)
    loss.backward()
    tp = ps.get_tensor_model_parallel_group()
    for p in sequence_parallel_grads_to_sum(model):
        dist.all_reduce(p.grad, group=tp)
    for name, p in model.named_parameters():
        if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):  # each rank saw only its heads
            dist.all_reduce(p.grad, group=tp)
        if ".experts." in name:  # each TP rank's expert copy saw only its rank's tokens
            dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group())
    grads = full_to_hf(gather_full(model, arch, {n: p.grad for n, p in model.named_parameters()}), arch)
    if dist.get_rank() == 0:
        torch.save({"logprobs": lp.detach(), "loss": loss.detach(), "grads": grads}, out)
    dist.barrier()


def test_moe_with_tp2_and_sequence_parallelism_matches_hf_without_te(tiny_moe_model, tmp_path):
    out = tmp_path / "rank0.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           __file__, "--worker", str(tiny_moe_model), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, ref = torch.load(out, weights_only=False), hf_reference(tiny_moe_model)
    assert (got["logprobs"] - ref["logprobs"]).abs().max() < 1e-5
    assert abs(float(got["loss"] - ref["loss"])) < 1e-5
    assert set(got["grads"]) >= set(ref["grads"])
    assert_grads_close(got["grads"], ref["grads"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    _worker(sys.argv[sys.argv.index("--worker") + 1], Path(sys.argv[sys.argv.index("--worker") + 2]))
