"""Patches that let megatron-core 0.16.1 run without TransformerEngine, and on machines without CUDA.

Two independent sets, both idempotent:

- `apply_no_te_patches()`: needed on every machine without TransformerEngine (our GPU image has none
  either). megatron-core 0.16.1's MoE router references `moe_utils.te_general_gemm` although the
  import that defines it failed; setting it to None selects the plain torch.mm router path.
- `apply_cpu_patches()`: only when `torch.cuda.is_available()` is False. megatron-core hard-codes CUDA
  in a handful of places that a CPU run reaches (measured on this machine, see FIELD-NOTES.md):
    * `torch.cuda.current_device()` is used as a *device* for new tensors (rotary `inv_freq`, the
      global attention memory buffer, the MoE router, logits gathers). On a CPU-only torch it raises;
      returning "cpu" makes every one of those allocations land on the CPU.
    * the CUDA RNG tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`) reads
      and writes CUDA generator state. On CPU there is only one generator, so the tracker keeps the
      names it is given and forks into a no-op context (dropout is 0 in everything we build).
    * `get_default_causal_mask` allocates on "cuda".
Nothing here changes numerics: every patched function returns the same values on the CPU.
"""

from __future__ import annotations

import contextlib
import sys

import torch

_APPLIED: set[str] = set()


def apply_no_te_patches() -> None:
    """Let megatron-core's MoE router run without TransformerEngine (CPU and GPU)."""
    if "no_te" in _APPLIED:
        return
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _APPLIED.add("no_te")


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name, seed):
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = None  # only the name matters: forks are no-ops on CPU

    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        return contextlib.nullcontext()

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork


def apply_cpu_patches() -> bool:
    """Apply the CPU patches when there is no CUDA device; return whether they are active."""
    if torch.cuda.is_available():
        return False
    if "cpu" in _APPLIED:
        return True
    apply_no_te_patches()
    torch.cuda.current_device = lambda: "cpu"  # used by megatron only as a device for allocations
    import megatron.core.transformer.utils  # noqa: F401  (make sure the module is loaded before patching)

    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.") and hasattr(module, "get_default_causal_mask"):
            module.get_default_causal_mask = _cpu_causal_mask
    _patch_rng_tracker()
    _APPLIED.add("cpu")
    return True


def apply_patches() -> bool:
    """Everything this machine needs; returns True when the CPU patches are active."""
    apply_no_te_patches()
    return apply_cpu_patches()
