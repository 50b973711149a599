"""HTTP side of the weight update (admin only; the middleware checks the token).

PUT  /flywheel/admin/weights/buckets/{push_id}/{index}   stage one bucket (raw safetensors bytes)
POST /flywheel/admin/weights/push                        commit a push (PushRequest JSON)
POST /flywheel/admin/weights/nccl/init                   join a trainer's NCCL group (NCCLInitRequest)
See server/weights/protocol.py for the semantics, gpu_client.py for the GPU transports.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

from flywheel.server.routes import error, policy_of
from flywheel.server.weights.gpu import HandleError, check_ipc_handles
from flywheel.server.weights.protocol import (
    ADMIN_PREFIX,
    BAD_VALUES,
    OLD_WEIGHTS_KEPT,
    PUSH_ID_PATTERN,
    SHA_HEADER,
    NCCLInitRequest,
    PushError,
    PushRequest,
    checkpoint_manifest,
    checkpoint_weight_files,
    tensor_list_entries,
    validate_buckets,
    validate_tensors,
)
from flywheel.server.weights.served_record import ServedRecord, pin_checkpoint, unpin, write_record

router = APIRouter()


def staging_root(request: Request) -> Path:
    """Where HTTP buckets are staged: tmpfs when the host has one (no disk I/O on the way)."""
    state = request.app.state
    if not hasattr(state, "flywheel_staging"):
        base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else state.flywheel_config.data_dir
        state.flywheel_staging = Path(tempfile.mkdtemp(prefix="flywheel-stage-", dir=base))
        atexit.register(shutil.rmtree, state.flywheel_staging, True)  # on a normal shutdown (SIGTERM too)
    return state.flywheel_staging


def served_manifest(request: Request):
    return manifest_of(request.app.state)


def manifest_of(state):
    """(names, dtypes and shapes of the served checkpoint, whether lm_head is tied), read once."""
    if not hasattr(state, "flywheel_manifest"):
        model_dir = Path(state.flywheel_policy.model)
        config = json.loads((model_dir / "config.json").read_text())
        state.flywheel_manifest = (checkpoint_manifest(model_dir), bool(config.get("tie_word_embeddings", False)))
    return state.flywheel_manifest


@router.put(ADMIN_PREFIX + "/buckets/{push_id}/{index}")
async def stage_bucket(push_id: str, index: int, request: Request) -> JSONResponse:
    config = request.app.state.flywheel_config
    if "http" not in config.weight_transports:
        return error(400, "this server does not accept the http weight transport")
    if not re.fullmatch(PUSH_ID_PATTERN, push_id) or not 0 <= index < 100_000:
        return error(400, "push_id must be 1-64 of [A-Za-z0-9_-] and index in [0, 100000)")
    expected = request.headers.get(SHA_HEADER, "").lower()
    if len(expected) != 64:
        return error(400, f"header {SHA_HEADER} (hex sha256 of the bucket) is required")
    declared = int(request.headers.get("content-length") or 0)
    if declared > config.max_bucket_bytes:
        return error(413, f"bucket of {declared} bytes exceeds max_bucket_bytes={config.max_bucket_bytes}")
    staged = sum(f.stat().st_size for f in staging_root(request).glob("*/*") if f.is_file())
    if staged + declared > config.max_push_bytes:  # uploads never committed must not fill the host's memory
        return error(
            413,
            f"{staged} bytes are staged and not committed; this bucket would exceed max_push_bytes="
            f"{config.max_push_bytes} (commit or abandon the earlier uploads)",
        )
    folder = staging_root(request) / push_id
    folder.mkdir(exist_ok=True)
    final = folder / f"bucket-{index:05d}.safetensors"
    part = final.with_suffix(".part")
    digest, size = hashlib.sha256(), 0
    try:
        with open(part, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_bucket_bytes:
                    raise PushError(413, f"bucket exceeds max_bucket_bytes={config.max_bucket_bytes}")
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != expected:
            raise PushError(
                400,
                f"bucket {index}: checksum mismatch ({size} bytes received, sha256 {digest.hexdigest()[:12]}... != "
                f"{expected[:12]}...)",
            )
    except ClientDisconnect:
        _drop_refused_upload(part)
        return error(400, "client disconnected mid-bucket; nothing was applied")
    except PushError as exc:
        _drop_refused_upload(part)
        return error(exc.status, exc.message)
    part.rename(final)
    final.with_suffix(".sha256").write_text(expected)
    return JSONResponse({"push_id": push_id, "index": index, "bytes": size, "sha256": expected})


def _drop_refused_upload(part: Path) -> None:
    """A refused bucket leaves nothing: its partial file, and its push's folder if nothing else is in it."""
    part.unlink(missing_ok=True)
    try:
        part.parent.rmdir()
    except OSError:
        pass  # other buckets of the push are staged there


def _bucket_paths(push: PushRequest, request: Request) -> list[str]:
    if push.transport == "shm":
        paths = [b.path for b in push.buckets]
        if any(p is None or not os.path.isabs(p) or not p.endswith(".safetensors") for p in paths):
            raise PushError(400, "shm transport: every bucket needs an absolute `path` to a .safetensors file")
        return paths
    if not push.push_id:
        raise PushError(400, "http transport: `push_id` is required")
    folder = staging_root(request) / push.push_id
    paths = []
    for b in push.buckets:
        if b.index is None or not b.sha256:
            raise PushError(400, "http transport: every bucket needs `index` and `sha256`")
        path = folder / f"bucket-{b.index:05d}.safetensors"
        sidecar = path.with_suffix(".sha256")
        if not path.is_file() or not sidecar.is_file():
            raise PushError(400, f"bucket {b.index} of push {push.push_id} was not uploaded (or its upload failed)")
        if sidecar.read_text().strip() != b.sha256.lower():
            raise PushError(400, f"bucket {b.index}: staged checksum differs from the one in the commit")
        paths.append(str(path))
    return paths


def _check_push(body: PushRequest, request: Request) -> tuple[dict, dict]:
    """Everything that can refuse a push before the engine is touched: (update_info, summary) or PushError."""
    config = request.app.state.flywheel_config
    policy = policy_of(request)
    if body.version <= policy.version:
        raise PushError(409, f"version {body.version} is not newer than the served version {policy.version}")
    if body.transport not in config.weight_transports:
        raise PushError(400, f"transport {body.transport!r} is not enabled on this server ({config.weight_transports})")
    manifest, tied = served_manifest(request)
    if body.checkpoint is not None:  # what a restart will load must be a whole set of weights of this model
        validate_buckets(checkpoint_weight_files(body.checkpoint), manifest, tied)
    if body.tensors is not None:  # nccl / ipc
        summary = validate_tensors(tensor_list_entries(body.tensors), manifest, tied)
        if summary["bytes"] > config.max_push_bytes:
            raise PushError(413, f"push of {summary['bytes']} bytes exceeds max_push_bytes={config.max_push_bytes}")
        info = body.tensors.model_dump()
        if body.transport == "ipc":
            try:
                check_ipc_handles(body.ipc_handles, body.tensors)
            except HandleError as exc:
                raise PushError(400, str(exc)) from None
            info["flywheel_ipc_handles"] = body.ipc_handles  # decoded in the worker (JSON across the RPC)
        return info, summary
    paths = _bucket_paths(body, request)
    total = sum(os.path.getsize(p) for p in paths if os.path.exists(p))
    if total > config.max_push_bytes:
        raise PushError(413, f"push of {total} bytes exceeds max_push_bytes={config.max_push_bytes}")
    return {"files": paths}, validate_buckets(paths, manifest, tied)


@router.post(ADMIN_PREFIX + "/push")
async def push(body: PushRequest, request: Request):
    """Validate the whole push, then apply it under a pause; all-or-nothing."""
    policy = policy_of(request)
    t0 = time.perf_counter()
    timeout_s = request.app.state.flywheel_config.push_lock_timeout_s
    try:  # one push at a time; a push that cannot get its turn gives up instead of queueing forever
        await asyncio.wait_for(policy.update_lock.acquire(), timeout_s)
    except TimeoutError:
        _drop_staged(body, request)
        return error(
            503, f"another weight push held the update lock for over {timeout_s} s; nothing applied, retry later"
        )
    if await request.is_disconnected():  # its client gave up while it waited: applying it would surprise everyone
        policy.update_lock.release()
        _drop_staged(body, request)
        return error(400, "the client disconnected before its push could start; nothing applied")
    try:
        info, summary = await asyncio.to_thread(_check_push, body, request)
    except PushError as exc:
        policy.update_lock.release()
        policy.failed_pushes += 1
        _drop_staged(body, request)
        return error(exc.status, exc.message)
    except BaseException:
        policy.update_lock.release()
        raise
    t_valid = time.perf_counter()
    # From here the engine is touched: the commit runs as its own task (it holds the lock and is
    # never cancelled by a client that goes away).
    commit = asyncio.ensure_future(_commit(request, body, info, summary, t0, t_valid))
    if body.transport == "nccl":
        return StreamingResponse(_nccl_lines(commit), media_type="application/x-ndjson")
    result = await asyncio.shield(commit)
    return result if isinstance(result, JSONResponse) else JSONResponse(result)


async def _nccl_lines(commit: asyncio.Future):
    """NCCL: 'ready' tells the trainer to broadcast (the worker is, or is about to be, receiving)."""
    yield json.dumps({"status": "ready"}) + "\n"
    result = await asyncio.shield(commit)
    yield (result.body.decode() if isinstance(result, JSONResponse) else json.dumps(result)) + "\n"


def _drop_staged(body: PushRequest, request: Request) -> None:
    if body.transport == "http" and body.push_id:
        shutil.rmtree(staging_root(request) / body.push_id, ignore_errors=True)


async def _commit(request: Request, body: PushRequest, info: dict, summary: dict, t0: float, t_valid: float):
    policy = policy_of(request)
    data_dir = request.app.state.flywheel_config.data_dir
    pinned = None
    try:
        if body.checkpoint is not None:  # before the engine is touched: a restart must find these files
            try:
                files = checkpoint_weight_files(body.checkpoint)
                pinned = await asyncio.to_thread(pin_checkpoint, data_dir, body.version, files)
            except OSError as exc:
                raise PushError(500, f"could not pin checkpoint {body.checkpoint!r} in the data dir: {exc}") from None
        timings = await apply_weights(request.app.state.engine_client, policy, body.version, body.pause_mode, info)
        record = ServedRecord(
            version=body.version,
            kind="weights" if pinned else "unrecoverable",
            folder=str(pinned) if pinned else None,
            checkpoint=body.checkpoint,
            source=body.source,
        )
        record_durably(policy, data_dir, record)
        policy.publish(body.version, source=body.source, transport=body.transport, **summary)
        await asyncio.to_thread(unpin, data_dir, pinned)  # the previous version's pin is no longer named
    except PushError as exc:
        policy.failed_pushes += 1
        if pinned is not None and policy.version != body.version:
            shutil.rmtree(pinned, ignore_errors=True)
        return error(exc.status, exc.message)
    finally:
        policy.update_lock.release()
        _drop_staged(body, request)
    return {
        "version": policy.version,
        **summary,
        "seconds": {"validate": round(t_valid - t0, 4), **timings, "total": round(time.perf_counter() - t0, 4)},
    }


def record_durably(policy, data_dir, record: ServedRecord) -> None:
    """Write the served-version record before `record.version` is published (server/weights/served_record.py).

    The weights are applied by then: if the record cannot be written, the server would serve weights a
    restart cannot bring back, under the old version number; it stops serving instead (until a push)."""
    try:
        write_record(data_dir, record)
    except OSError as exc:
        policy.broken = f"version {record.version} was applied but could not be recorded in {data_dir}: {exc}"
        raise PushError(500, policy.broken) from None


@contextlib.asynccontextmanager
async def paused(engine, policy, mode: str):
    """Generation paused in `mode` for the block; resumed after it unless an admin had paused it
    (an admin's pause outlives any push: only the admin resumes)."""
    await engine.pause_generation(mode=mode)
    try:
        yield
    finally:
        if not policy.admin_paused:
            await engine.resume_generation()


async def apply_weights(engine, policy, version: int, pause_mode: str, info: dict) -> dict:
    """Apply a validated set of weights under a pause (update_info `info`); PushError when it fails."""
    t0 = time.perf_counter()
    async with paused(engine, policy, pause_mode):
        t_paused = time.perf_counter()
        try:
            await engine.start_weight_update()
            await engine.update_weights(WeightTransferUpdateRequest(update_info=info))
            await engine.finish_weight_update(str(version))
            # stale KV computed by the old weights must not be reused for new prompts
            await engine.reset_prefix_cache(reset_running_requests=False)
        except Exception as exc:
            if OLD_WEIGHTS_KEPT in str(exc):
                status = 400 if BAD_VALUES in str(exc) else 500
                raise PushError(status, f"weight update to version {version} failed: {exc}") from None
            # The reload had started: the weights may be half old, half new. Refuse to serve them.
            policy.broken = f"weight update to version {version} failed while applying: {exc}"
            raise PushError(500, policy.broken) from None
    t_done = time.perf_counter()
    return {"pause": round(t_paused - t0, 4), "apply": round(t_done - t_paused, 4)}


@router.post(ADMIN_PREFIX + "/nccl/init")
async def nccl_init(body: NCCLInitRequest, request: Request) -> JSONResponse:
    """Join the trainer's NCCL group (the trainer is rank 0, this server's workers ranks 1..N)."""
    config = request.app.state.flywheel_config
    if "nccl" not in config.weight_transports:
        return error(400, f"this server does not accept the nccl weight transport ({config.weight_transports})")
    workers = config.weight_workers()
    if body.world_size != 1 + workers:
        return error(
            400,
            f"world_size must be 1 trainer rank + {workers} server worker(s) = {1 + workers}, got {body.world_size}",
        )
    policy = policy_of(request)
    async with policy.update_lock:  # no push while the group forms
        try:
            await request.app.state.engine_client.init_weight_transfer_engine(
                WeightTransferInitRequest(init_info={**body.model_dump(), "rank_offset": 1})
            )
        except Exception as exc:
            return error(500, f"NCCL group init failed: {exc}")
    return JSONResponse({"status": "joined", "world_size": body.world_size})
