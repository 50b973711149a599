"""TE-free sequence parallelism, the piece megatron-core 0.16.1 needs for MoE with tensor parallelism.

megatron's MoELayer refuses to train with TP > 1 unless `sequence_parallel` is on, and the norm the
local (no-TE) spec ships, WrappedTorchNorm, asserts that it is off. The assertion guards only the
gradient bookkeeping: under sequence parallelism a norm sees s/TP rows, so its weight gradient is a
partial sum per TP rank and must be all-reduced over TP (megatron's finalize_model_grads does it for
parameters flagged `sequence_parallel`; MegatronPolicy.finalize_grads does our reductions). The
collectives SP uses (all_gather_into_tensor, reduce_scatter_tensor) run on gloo.

Wired in: model.py turns on sequence_parallel with whole experts per TP rank
(expert_tensor_parallel_size=1) for MoE with TP > 1 and calls `use_sequence_parallel_norms`;
MegatronPolicy pads T to a multiple of TP and sums sequence-parallel grads over TP and expert grads
over the expert-data-parallel group. Measured on CPU (tests/test_megatron_sequence_parallel.py,
tests/test_megatron.py): tiny-qwen3-moe at TP=2 gives HF's log-probs, loss, gradients and clip norm.
"""

from __future__ import annotations

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """RMSNorm over this rank's s/TP rows; its weight grad is partial per TP rank (flagged sequence_parallel)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = True


class HeadRMSNorm(torch.nn.RMSNorm):
    """q/k norm over head_dim: it runs after linear_qkv's sequence gather, on full sequences of local heads."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


def use_sequence_parallel_norms(block_spec) -> None:
    """Swap every norm of a local decoder-block spec (from model.layer_specs) for the SP-capable ones, in place."""
    for layer in block_spec.layer_specs:
        shipped = layer.submodules.input_layernorm  # WrappedTorchNorm; q/k norms are it too, or IdentityOp
        layer.submodules.input_layernorm = SequenceParallelRMSNorm
        layer.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
        attention = layer.submodules.self_attention.submodules
        if getattr(attention, "q_layernorm", None) is shipped:
            attention.q_layernorm = HeadRMSNorm
            attention.k_layernorm = HeadRMSNorm
    block_spec.layer_norm = SequenceParallelRMSNorm
