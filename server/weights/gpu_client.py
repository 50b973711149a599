"""Trainer side of the GPU transports (vLLM's NCCL and CUDA-IPC engines), behind push_weights.

    sender = init_nccl(url, admin_token, master_port=29555)       # once: join the NCCL group
    push_weights(url, model.state_dict(), 7, admin_token, transport="nccl", sender=sender)
    push_weights(url, model.state_dict(), 8, admin_token, transport="ipc")  # same GPU host, no setup

Both go through the same commit route as shm/http (POST /flywheel/admin/weights/push), so the
server checks the version (409), the names/shapes/dtypes (400) and pauses, resets the prefix
cache and publishes the version exactly as for a bucket push. The bytes then move through vLLM:
  nccl: the server answers a validated commit with a first NDJSON line {"status": "ready"}
        and blocks in vLLM's receive; the client then broadcasts (vLLM's packed producer) and
        reads the final line (the summary, or an error). A refused commit is a plain 4xx and
        nothing is broadcast, so neither side hangs.
  ipc : the commit carries the handles (gpu.py); the client keeps the tensors alive until the
        server has answered.
Needs torch with CUDA, and for nccl vLLM's pynccl (vllm importable in the trainer process).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from flywheel.server.status import fetch_status
from flywheel.server.weights.gpu import encode_ipc_args, require_cuda, tensor_list
from flywheel.server.weights.protocol import ADMIN_PREFIX, NCCLInitRequest
from flywheel.server.weights.push_answer import PushFailed, push_answer

DEFAULT_PACKED_BUFFER_BYTES = 1 << 30


class NCCLSender:
    """Rank 0 of the trainer<->server NCCL group; build it with init_nccl()."""

    def __init__(
        self,
        url: str,
        admin_token: str,
        *,
        master_address: str = "127.0.0.1",
        master_port: int = 29555,
        world_size: int | None = None,
        packed: bool = True,
        packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_BYTES,
        packed_num_buffers: int = 2,
        timeout: float = 600.0,
    ):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.admin_token = admin_token
        self.timeout = timeout
        self.init = NCCLInitRequest(
            master_address=master_address,
            master_port=master_port,
            world_size=world_size or 2,
            packed=packed,
            packed_buffer_size_bytes=packed_buffer_size_bytes,
            packed_num_buffers=packed_num_buffers,
        )
        self.world_size_given = world_size is not None
        self.group = None  # vLLM PyNcclCommunicator, once connected

    def init_body(self) -> dict:
        """The JSON body of POST /flywheel/admin/weights/nccl/init."""
        return self.init.model_dump()

    def connect(self) -> NCCLSender:
        """Join the group: the server's workers block in the rendezvous, so both sides run at once."""
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        headers = {"authorization": f"Bearer {self.admin_token}"}
        if not self.world_size_given:  # 1 trainer rank + the server's workers
            self.init.world_size = 1 + fetch_status(self.url, timeout=30).weights.workers
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(
                httpx.post,
                f"{self.url}{ADMIN_PREFIX}/nccl/init",
                json=self.init_body(),
                headers=headers,
                timeout=self.timeout,
            )
            self.group = trainer_init(self.init.model_dump(), rank=0)
            push_answer(future.result())
        return self

    def broadcast(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Send the tensors in the order the commit named them (vLLM's producer, packed or one by one)."""
        if self.group is None:
            raise RuntimeError("NCCLSender is not connected: build it with init_nccl(...)")
        if self.init.packed:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(
                iterator=iter(pairs),
                group=self.group,
                src=0,
                post_iter_func=lambda item: item[1],
                buffer_size_bytes=self.init.packed_buffer_size_bytes,
                num_buffers=self.init.packed_num_buffers,
            )
        else:
            stream = torch.cuda.current_stream()
            for _, t in pairs:
                self.group.broadcast(t if t.is_contiguous() else t.contiguous(), src=0, stream=stream)
        torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


def init_nccl(url: str, admin_token: str, **kwargs) -> NCCLSender:
    """Open the trainer<->server NCCL group once (kwargs: NCCLSender's); pass it to push_weights(sender=...)."""
    return NCCLSender(url, admin_token, **kwargs).connect()


def gpu_commit_body(
    pairs: list[tuple[str, torch.Tensor]],
    version: int,
    transport: str,
    pause_mode: str,
    source: str,
    ipc_handles: list[dict] | None = None,
    checkpoint: str | None = None,
) -> dict:
    """The commit of a GPU push: the same PushRequest as shm/http, with `tensors` instead of buckets."""
    body = {
        "version": version,
        "transport": transport,
        "pause_mode": pause_mode,
        "source": source,
        "tensors": tensor_list(pairs),
    }
    if transport == "ipc":
        body["ipc_handles"] = ipc_handles
    if checkpoint is not None:
        body["checkpoint"] = checkpoint
    return body


def push_gpu(
    http: httpx.Client,
    url: str,
    weights: dict,
    version: int,
    transport: str,
    pause_mode: str,
    source: str,
    sender: NCCLSender | None,
    checkpoint: str | None = None,
) -> dict:
    require_cuda(weights, transport)
    if transport == "nccl" and (sender is None or sender.group is None):
        raise ValueError("transport='nccl' needs sender=init_nccl(url, admin_token, ...) (once per trainer)")
    pairs = [(name, t.detach()) for name, t in weights.items()]
    if transport == "ipc":
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        pairs = [(name, t.contiguous()) for name, t in pairs]  # a handle shares the storage from its base
        handles = [encode_ipc_args(reduce_tensor(t)[1], uuid) for _, t in pairs]
        torch.cuda.current_stream().synchronize()  # the server reads the memory from another process
        result = push_answer(
            http.post(
                f"{url}{ADMIN_PREFIX}/push",
                json=gpu_commit_body(pairs, version, transport, pause_mode, source, handles, checkpoint),
            )
        )
        del pairs  # only now may the trainer's copies go
        torch.cuda.ipc_collect()
        return result
    body = gpu_commit_body(pairs, version, transport, pause_mode, source, checkpoint=checkpoint)
    with http.stream("POST", f"{url}{ADMIN_PREFIX}/push", json=body) as resp:
        if resp.status_code >= 400:
            resp.read()
            push_answer(resp)  # refused before anything was sent: nothing to broadcast
        lines = resp.iter_lines()
        ready = json.loads(next(lines))
        if ready.get("status") != "ready":
            raise PushFailed(500, f"unexpected first line from the server: {ready}")
        sender.broadcast(pairs)
        final = json.loads(next(lines))
    if "error" in final:
        raise PushFailed(final["error"].get("code", 500), final["error"]["message"])
    return final
