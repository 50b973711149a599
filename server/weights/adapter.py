"""Adapter-only pushes: a LoRA trainer sends its adapter (a few MB), not the whole model (issue 20).

POST /flywheel/admin/weights/adapter   {"version", "path", "pause_mode", "source"}   (admin token)

`path` is a folder on this host holding PEFT's adapter_config.json and adapter_model.safetensors.
The server checks all of it before the engine is touched: regular files only, the rank within
--max-lora-rank, every tensor a lora_A / lora_B of a module the served model has, with shapes that
fit that module and the rank, finite values, a version newer than the served one. Then it copies the
files into its own data dir (vLLM may re-read an adapter from disk later), and under the update lock
and the pause mode loads them in place under one stable name (--adapter-name, "policy"): requests
naming that model get the new adapter, requests naming the base model keep the base weights. The
prefix cache is reset (blocks computed under the old adapter keep the same LoRA id) and the version
is recorded durably (a restarted server loads that copy again, server/weights/restore.py) and
published; the previous adapter's files are removed. A refused push leaves the previous adapter
serving. The base weights are never touched, so the version counts adapter pushes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from flywheel.server.routes import error, policy_of
from flywheel.server.weights.protocol import ADMIN_PREFIX, MAX_VERSION, PushError, read_header
from flywheel.server.weights.routes import paused, record_durably, served_manifest
from flywheel.server.weights.served_record import ServedRecord, fsync_folder, read_record

router = APIRouter()
FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_ADAPTER_BYTES = 2 * 2**30


class AdapterPushRequest(BaseModel):
    """Body of POST /flywheel/admin/weights/adapter."""

    version: int = Field(ge=1, le=MAX_VERSION, description="The version this push creates (newer than the served one)")
    path: str = Field(description="Folder on the server's host with adapter_config.json + adapter_model.safetensors")
    pause_mode: Literal["keep", "wait", "abort"] = Field(
        default="keep", description="What in-flight requests do while the adapter is swapped (as for full pushes)"
    )
    source: str = Field(default="", max_length=200, description="Free text for the push history (e.g. trainer step)")


def _regular_file(path: Path) -> Path:
    try:
        mode = path.lstat().st_mode
    except OSError:
        raise PushError(400, f"adapter file {path.name} is missing") from None
    if not stat.S_ISREG(mode):
        raise PushError(400, f"adapter file {path.name} is not a regular file")
    return path


def check_adapter(folder: Path, max_rank: int, manifest: dict) -> dict:
    """Validate an adapter folder against the served model; raise PushError(400) on the first problem."""
    if not folder.is_absolute() or not folder.is_dir():
        raise PushError(400, "adapter path must be an absolute path of a folder on the server's host")
    config_file, tensors_file = (_regular_file(folder / name) for name in FILES)
    if tensors_file.stat().st_size > MAX_ADAPTER_BYTES:
        raise PushError(400, f"adapter is larger than {MAX_ADAPTER_BYTES >> 20} MiB")
    try:
        config = json.loads(config_file.read_text())
        rank = int(config["r"])
    except (ValueError, KeyError, TypeError):
        raise PushError(400, "adapter_config.json is not a PEFT LoRA config (no integer 'r')") from None
    if not 1 <= rank <= max_rank:
        raise PushError(400, f"adapter rank {rank} is outside 1..{max_rank} (the server's --max-lora-rank)")
    try:
        header = read_header(tensors_file)
    except Exception:
        raise PushError(400, "adapter_model.safetensors is not a safetensors file") from None
    modules: dict[str, dict[str, tuple]] = {}
    for name, meta in header.items():
        stem, _, kind = name.removesuffix(".weight").rpartition(".")
        if kind not in ("lora_A", "lora_B") or not stem.startswith("base_model.model."):
            raise PushError(400, f"adapter tensor {name!r} is not a LoRA A/B weight")
        modules.setdefault(stem.removeprefix("base_model.model."), {})[kind] = tuple(meta["shape"])
    if not modules:
        raise PushError(400, "adapter has no tensors")
    for module, parts in sorted(modules.items()):
        base = manifest.get(module + ".weight")
        if base is None:
            raise PushError(400, f"adapter targets {module!r}, which the served model does not have")
        if set(parts) != {"lora_A", "lora_B"}:
            raise PushError(400, f"adapter module {module!r} lacks {({'lora_A', 'lora_B'} - set(parts)).pop()}")
        out_features, in_features = base[1]
        if parts["lora_A"] != (rank, in_features) or parts["lora_B"] != (out_features, rank):
            raise PushError(
                400,
                f"adapter module {module!r}: A {list(parts['lora_A'])} / B {list(parts['lora_B'])} do not fit "
                f"rank {rank} and the weight's [{out_features}, {in_features}]",
            )
    import torch
    from safetensors.torch import load_file  # values: the adapter is small, read it whole

    for name, tensor in load_file(tensors_file).items():
        if not bool(torch.isfinite(tensor).all()):
            raise PushError(400, f"adapter tensor {name!r} holds NaN or Inf; nothing applied")
    return {"rank": rank, "modules": len(modules), "bytes": tensors_file.stat().st_size}


@router.post(ADMIN_PREFIX + "/adapter")
async def push_adapter(body: AdapterPushRequest, request: Request):
    """Validate, copy and load an adapter in place under the stable adapter name; all-or-nothing."""
    state = request.app.state
    config = state.flywheel_config
    if not config.max_lora_rank:
        return error(400, "this server does not serve adapters: start it with --max-lora-rank")
    policy = policy_of(request)
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(policy.update_lock.acquire(), config.push_lock_timeout_s)
    except TimeoutError:
        return error(503, "another push held the update lock too long; nothing applied, retry later")
    try:
        if body.version <= policy.version:
            raise PushError(409, f"version {body.version} is not newer than the served {policy.version}")
        manifest, _ = served_manifest(request)
        summary = await asyncio.to_thread(check_adapter, Path(body.path), config.max_lora_rank, manifest)
        owned = Path(config.data_dir) / "adapters" / f"v{body.version}"
        shutil.rmtree(owned, ignore_errors=True)
        owned.mkdir(parents=True)
        for name in FILES:
            shutil.copyfile(Path(body.path) / name, owned / name)
        await asyncio.to_thread(fsync_folder, owned)  # a restart loads this copy
        timings = await load_adapter(state, policy, config.adapter_name, owned, body.pause_mode)
        # the server's own copy is what a restart loads (server/weights/served_record.py)
        record_durably(policy, config.data_dir, adapter_record(config.data_dir, body.version, owned, body.source))
        policy.publish(body.version, source=body.source, transport="adapter", **summary)
        for old in owned.parent.glob("v*"):
            if old != owned:
                shutil.rmtree(old, ignore_errors=True)
    except PushError as exc:
        policy.failed_pushes += 1
        return error(exc.status, exc.message)
    finally:
        policy.update_lock.release()
    return JSONResponse(
        {
            "version": policy.version,
            "adapter": config.adapter_name,
            **summary,
            "seconds": {**timings, "total": round(time.perf_counter() - t0, 4)},
        }
    )


def adapter_record(data_dir, version: int, folder: Path, source: str) -> ServedRecord:
    """The record of an adapter push: the adapter, on the base weights the last full push left (if any)."""
    try:
        previous = read_record(data_dir)
    except (OSError, ValueError):
        previous = ServedRecord(version=version, kind="unrecoverable")  # the base weights are unknown
    if previous is not None and previous.kind == "unrecoverable":
        return ServedRecord(version=version, kind="unrecoverable", source=source)
    base = previous.base if previous is not None and previous.kind == "adapter" else None
    if previous is not None and previous.kind == "weights":
        base = previous.folder
    return ServedRecord(version=version, kind="adapter", folder=str(folder), base=base, source=source)


async def load_adapter(state, policy, name: str, folder: Path, pause_mode: str) -> dict:
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    t0 = time.perf_counter()
    async with paused(state.engine_client, policy, pause_mode):
        t_paused = time.perf_counter()
        models = state.openai_serving_models
        answer = await models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=str(folder), load_inplace=name in models.lora_requests)
        )
        if not isinstance(answer, str):  # vLLM's ErrorResponse
            raise PushError(400, f"vLLM refused the adapter: {getattr(answer, 'error', answer)}")
        # the in-place load keeps the LoRA id: blocks cached under the old adapter must not be reused
        await state.engine_client.reset_prefix_cache(reset_running_requests=False)
    return {"pause": round(t_paused - t0, 4), "apply": round(time.perf_counter() - t_paused, 4)}
