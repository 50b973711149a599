"""Which rank talks to the outside world, and how the others learn what it heard.

Under torchrun every rank runs the same recipe, but Redis, the server's /flywheel/status and the
weight push are talked to by rank 0 alone (one consumer, one pusher); what rank 0 learns that
changes the recipe's control flow (the served version a push continues from) is broadcast, so
every rank takes the same branch and enters the same collectives. Values travel as JSON in a
byte tensor (ints, strings, lists, dicts): no pickle crosses ranks.

Without torch.distributed (or at world size 1) both functions are trivial, so the transformers
backend and the megatron backend at world size 1 go through the same code.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (CPU) only CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_main_rank(value: Any) -> Any:
    """Rank 0's `value` on every rank (a collective: every rank calls it; what the others pass is ignored).

    `value` must be JSON-serialisable on rank 0.
    """
    if not distributed():
        return value
    device = _device()
    data = json.dumps(value).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        if dist.get_rank() == 0
        else torch.empty(int(size), dtype=torch.uint8, device=device)
    )
    dist.broadcast(buffer, src=0)
    return json.loads(buffer.cpu().numpy().tobytes()) if dist.get_rank() != 0 else value
