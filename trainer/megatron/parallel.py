"""Process groups for the megatron backend: torch.distributed + megatron's model-parallel state.

Launch with torchrun (it sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT); a plain `python`
run is world size 1 on a private loopback rendezvous. The backend is gloo on CPU and NCCL on GPU.
The data-parallel degree is what is left: world = TP * PP * DP (experts: EP divides TP * DP).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from flywheel.server.errors import UserError
from flywheel.trainer.megatron.cpu_patches import apply_patches

if TYPE_CHECKING:
    from flywheel.trainer.policy_interface import ParallelConfig


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(config: ParallelConfig | None = None, seed: int = 0) -> None:
    """Start torch.distributed (if needed) and megatron's model-parallel groups (None: all degrees 1).

    `seed` seeds torch and megatron's model-parallel RNG tracker (weight init, dropout).
    """
    from megatron.core import parallel_state, tensor_parallel

    tp, pp, ep = (1, 1, 1) if config is None else (config.tensor, config.pipeline, config.expert)
    apply_patches()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" not in os.environ:
            # plain python: a world of one, whose rendezvous is an in-process store, and no RANK/MASTER_*
            # in os.environ: set there, they leaked into the processes this one starts (a test's trainer
            # subprocess then bound its parent's MASTER_PORT: EADDRINUSE)
            if torch.cuda.is_available():
                torch.cuda.set_device(0)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
    world = dist.get_world_size()
    if world % (tp * pp):
        hint = " (launch the ranks with: torchrun --nproc_per_node N -m flywheel.clients.cli train ...)"
        hint = hint if world == 1 else ""
        raise UserError(f"world size {world} is not a multiple of TP*PP = {tp * pp}{hint}")
    if ep > 1 and (world // pp) % ep:
        raise UserError(f"parallel.expert={ep} must divide TP*DP = {world // pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        # experts are never split over TP (model.py: MoE + TP runs sequence-parallel with whole experts)
        expert_tensor_parallel_size=1,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
