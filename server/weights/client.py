"""Client side of the weight update: what the trainer calls.

    push_weights("http://127.0.0.1:8000", model.state_dict(), version=3, admin_token=token)

`weights` is a dict of HF-named tensors (any device/dtype; float tensors are cast by the server
to the served dtype) or an HF checkpoint folder (its safetensors files are sent as they are).
Transports (see protocol.py): "shm" writes buckets to /dev/shm on this host and names them,
"http" streams them; "auto" picks shm for a loopback URL, http otherwise; "nccl" and "ipc" move
CUDA tensors through vLLM's own engines (gpu_client.py; nccl needs `sender=init_nccl(...)` once).
A folder that already is safetensors is handed over as it is (shm) or streamed file by file
(http): never re-serialised. The push is
all-or-nothing on the server: on any error this raises PushFailed and the server keeps serving
the weights and version it had.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import httpx
import torch

from flywheel.server.weights.protocol import ADMIN_PREFIX, GPU_TRANSPORTS, SHA_HEADER, TORCH_DTYPES
from flywheel.server.weights.push_answer import PushFailed, push_answer  # noqa: F401  (PushFailed: what push_weights raises)

Transport = Literal["auto", "shm", "http", "nccl", "ipc"]
TRANSPORTS = ("auto", "shm", "http", *GPU_TRANSPORTS)
DEFAULT_BUCKET_BYTES = 512 * 2**20


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auto_transport(url: str) -> str:
    """What transport="auto" picks: shm for a server on this host (with a writable /dev/shm), else http."""
    return "shm" if is_loopback(url) and os.access("/dev/shm", os.W_OK) else "http"


def bucketize(weights: dict, bucket_bytes: int) -> Iterator[dict]:
    """Split a state dict into dicts of contiguous CPU tensors of about bucket_bytes each."""
    bucket, size = {}, 0
    for name, tensor in weights.items():
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += nbytes
    if bucket:
        yield bucket


def _dedupe_tied(weights: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): send one copy of each storage."""
    seen, out = set(), {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t
    return out


def write_safetensors(tensors: dict, path: Path) -> None:
    """A safetensors file written straight from the tensors' memory: one copy, into the page cache.

    (safetensors' save_file first builds the whole file as one bytes object: a second copy.)
    """
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": TORCH_DTYPES[str(t.dtype).removeprefix("torch.")][0],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if t.numel():
                fh.write(memoryview(t.detach().cpu().reshape(-1).view(torch.uint8).numpy()))  # GPU adapters too


def _write_buckets(weights: dict | Path, folder: Path, bucket_bytes: int) -> list[Path]:
    if isinstance(weights, (str, Path)):
        return sorted(Path(weights).glob("*.safetensors"))
    paths = []
    for i, bucket in enumerate(bucketize(_dedupe_tied(weights), bucket_bytes)):
        path = folder / f"bucket-{i:05d}.safetensors"
        write_safetensors(bucket, path)
        paths.append(path)
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: Path, chunk: int = 8 << 20) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            yield data


def push_weights(
    url: str,
    weights: dict | str | os.PathLike,
    version: int,
    admin_token: str,
    *,
    transport: Transport = "auto",
    pause_mode: Literal["keep", "wait", "abort"] = "keep",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    source: str = "",
    timeout: float = 600.0,
    sender=None,
    buckets=None,
    checkpoint: str | os.PathLike | None = None,
) -> dict:
    """Push a full set of weights as `version`; returns the server's summary (version, tensors, bytes, seconds).

    checkpoint: a folder on the server's host whose *.safetensors hold exactly these weights (the
        trainer's checkpoint of this version): a restarted server serves it as this version. A folder
        pushed over shm is its own checkpoint. Without one the version does not survive a restart.
    sender: for transport="nccl", the NCCLSender that init_nccl() returned (the group is opened once).
    buckets: for shm pushes of a state dict, a `ShmBuckets` (shm_buckets.py) whose files are
        overwritten push after push instead of written anew (several times faster to write).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")
    if pause_mode not in ("keep", "wait", "abort"):
        raise ValueError(f"unknown pause_mode {pause_mode!r}; choose keep, wait or abort")
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {admin_token}"}
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).resolve())
    if transport in GPU_TRANSPORTS:
        if not isinstance(weights, dict):
            raise ValueError(
                f"transport={transport!r} pushes a state dict of CUDA tensors, not a folder; "
                f"push a checkpoint folder with transport='shm' or 'http'"
            )
        from flywheel.server.weights.gpu_client import push_gpu

        t0 = time.perf_counter()
        with httpx.Client(timeout=timeout, headers=headers) as http:
            result = push_gpu(
                http, url, _dedupe_tied(weights), version, transport, pause_mode, source, sender, checkpoint
            )
        result["client_seconds"] = {"total": round(time.perf_counter() - t0, 4)}
        result["transport"] = transport
        return result
    if transport == "auto":
        transport = auto_transport(url)
    if isinstance(weights, (str, os.PathLike)):
        weights = Path(weights)
        if not any(weights.glob("*.safetensors")):
            raise FileNotFoundError(f"no safetensors files in {weights}")
        if checkpoint is None and transport == "shm":  # the server reads these very files
            checkpoint = str(weights.resolve())
    t0 = time.perf_counter()
    reuse = buckets is not None and transport == "shm" and isinstance(weights, dict)
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    folder = None if reuse else Path(tempfile.mkdtemp(prefix="flywheel-push-", dir=base))
    try:
        paths = buckets.write(weights, bucket_bytes) if reuse else _write_buckets(weights, folder, bucket_bytes)
        t_written = time.perf_counter()
        with httpx.Client(timeout=timeout, headers=headers) as http:
            if transport == "shm":
                body = {
                    "version": version,
                    "transport": "shm",
                    "pause_mode": pause_mode,
                    "source": source,
                    "buckets": [{"path": str(p.resolve())} for p in paths],
                }
            else:
                push_id = uuid.uuid4().hex
                uploaded = []
                for i, path in enumerate(paths):
                    sha = _sha256(path)
                    resp = http.put(
                        f"{url}{ADMIN_PREFIX}/buckets/{push_id}/{i}",
                        content=_file_chunks(path),
                        headers={
                            SHA_HEADER: sha,
                            "content-type": "application/octet-stream",
                            "content-length": str(path.stat().st_size),
                        },
                    )
                    push_answer(resp)
                    uploaded.append({"index": i, "sha256": sha})
                body = {
                    "version": version,
                    "transport": "http",
                    "push_id": push_id,
                    "pause_mode": pause_mode,
                    "source": source,
                    "buckets": uploaded,
                }
            if checkpoint is not None:
                body["checkpoint"] = checkpoint
            t_sent = time.perf_counter()
            result = push_answer(http.post(f"{url}{ADMIN_PREFIX}/push", json=body))
    except BaseException:
        if reuse:
            buckets.discard()  # the server may still be reading them: the next push writes new files
        raise
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    result["client_seconds"] = {
        "serialize": round(t_written - t0, 4),
        "send": round(t_sent - t_written, 4),
        "total": round(time.perf_counter() - t0, 4),
    }
    result["transport"] = transport
    return result


def push_adapter(
    url: str,
    tensors: dict[str, torch.Tensor],
    adapter_config: dict,
    version: int,
    admin_token: str,
    *,
    pause_mode: Literal["keep", "wait", "abort"] = "keep",
    source: str = "",
    timeout: float = 300.0,
) -> dict:
    """Push only a LoRA adapter (PEFT names and config) to a server on this host started with
    --max-lora-rank: the files go to a fresh folder under /dev/shm (the server copies them), then
    POST /flywheel/admin/weights/adapter; the folder is removed whatever the answer. Raises PushFailed."""
    if not is_loopback(url):
        raise ValueError("adapter pushes pass a folder on the server's host: the server must be on loopback")
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="flywheel-adapter-", dir=base))
    try:
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter_config.items()}
        (folder / "adapter_config.json").write_text(json.dumps(config, default=str))
        write_safetensors(
            {k: v.detach().contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors"
        )
        body = {"version": version, "path": str(folder), "pause_mode": pause_mode, "source": source}
        url = url.rstrip("/").removesuffix("/v1")
        with httpx.Client(timeout=timeout, headers={"authorization": f"Bearer {admin_token}"}) as http:
            resp = http.post(url + ADMIN_PREFIX + "/adapter", json=body)
        return push_answer(resp)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
