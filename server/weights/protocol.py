"""The weight-update protocol: what a push is, and how a bucket is checked before anything is applied.

A push replaces the served weights with a full set of HF-named tensors and creates version v+1.
The tensors travel as *buckets*: safetensors files (raw bytes, never pickle, never base64),
  shm  : the trainer writes the buckets into a folder on the same host (/dev/shm when present)
         and names the files in the commit; the server maps them (zero-copy mmap).
  http : the trainer streams each bucket as the raw body of
         PUT /flywheel/admin/weights/buckets/{push_id}/{index} with header x-flywheel-sha256;
         the server stages it (size limit, checksum checked while streaming), then the commit
         names the push_id and the bucket checksums.
Then POST /flywheel/admin/weights/push with a PushRequest (JSON) commits:
  1. version must be newer than the served one (else 409);
  2. every bucket's header is read and checked against the served checkpoint's manifest: known
     names, equal shapes, float dtypes for float tensors, file sizes matching the header (a
     truncated bucket is caught here), and together they must cover every tensor (a partial
     push is refused: vLLM's in-place reload re-creates whole layers);
  3. only then: pause (keep | wait | abort), load all tensors in the worker, apply, re-pack what
     the CPU kernels pre-packed, reset the prefix cache, publish the version, resume.
Steps 1-2 fail with a 4xx and leave the old weights and version serving.

`checkpoint` (optional, any transport): the absolute path of a folder on the server's host whose
*.safetensors hold exactly the pushed weights (the trainer's durable checkpoint of that version).
It is checked like the buckets (step 2) and pinned in the server's data dir, so a restarted server
comes back serving this version (server/weights/served_record.py). A push without one is served
until a restart, after which the server refuses traffic until the next push.

GPU transports (vLLM's own NCCL and CUDA-IPC engines, see server/weights/gpu.py) carry no buckets:
the commit names every tensor (`tensors`: names, torch dtype names, shapes) and, for ipc, one
CUDA-IPC handle per tensor; the same checks (version, names/shapes/dtypes against the manifest,
completeness) run on that list before the engine is touched.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from flywheel.server.weights.gpu import TORCH_DTYPES  # noqa: F401  (re-exported: the dtype table of every transport)

ADMIN_PREFIX = "/flywheel/admin/weights"
SHA_HEADER = "x-flywheel-sha256"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER_BYTES = 100 * 2**20
Transport = Literal["shm", "http", "nccl", "ipc"]
GPU_TRANSPORTS = ("nccl", "ipc")


# A worker error that starts with this left every live tensor as it was (server/weights/apply.py):
# the push failed, but the server is not marked broken.
OLD_WEIGHTS_KEPT = "nothing applied, the old weights keep serving"
MAX_VERSION = 2**53 - 1
PUSH_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # ASCII only: the upload route and the commit accept the same ids
# a worker's refusal of the pushed values themselves (NaN/Inf): the client's fault, answered 400
BAD_VALUES = "refused values"
# the refusal of a push's `checkpoint` the server cannot read (e.g. a trainer on another host)
CHECKPOINT_NOT_VISIBLE = "not a folder of safetensors weights on the server's host"


class PushError(Exception):
    """A push refused before anything was applied: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BucketRef(BaseModel):
    """One bucket of a push."""

    path: str | None = Field(default=None, description="shm transport: absolute path of the safetensors file")
    index: int | None = Field(default=None, description="http transport: index of a bucket uploaded under push_id")
    sha256: str | None = Field(default=None, description="hex sha256 of the bucket bytes (required for http)")


class TensorList(BaseModel):
    """GPU transports: every tensor of the push, in the order the trainer sends them (vLLM's update_info fields)."""

    names: list[str] = Field(min_length=1, description="HF tensor names")
    dtype_names: list[str] = Field(description="torch dtype names, e.g. 'bfloat16'")
    shapes: list[list[int]] = Field(description="Full shapes")

    @model_validator(mode="after")
    def _consistent(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"names, dtype_names and shapes must have equal lengths "
                f"({len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)})"
            )
        bad = next((d for d in self.dtype_names if d not in TORCH_DTYPES), None)
        if bad is not None:
            raise ValueError(f"dtype {bad!r} is not one of {sorted(TORCH_DTYPES)}")
        if any(dim < 0 for shape in self.shapes for dim in shape):
            raise ValueError("shapes must not have negative dimensions")
        return self


class PushRequest(BaseModel):
    """Body of POST /flywheel/admin/weights/push."""

    version: int = Field(
        ge=1,
        le=MAX_VERSION,
        description=(
            "The version this push creates; must be newer than the served one (at most 2**53 - 1, what JSON clients "
            "read exactly)"
        ),
    )
    transport: Transport = Field(description="How the tensors travel: shm/http buckets, or vLLM's nccl/ipc engines")
    buckets: list[BucketRef] = Field(default_factory=list, description="shm/http: all buckets of the push")
    push_id: str | None = Field(default=None, pattern=PUSH_ID_PATTERN, description="http transport: the upload id")
    tensors: TensorList | None = Field(default=None, description="nccl/ipc: every tensor of the push")
    ipc_handles: list[dict] | None = Field(
        default=None, description="ipc: one encoded CUDA-IPC handle per tensor (server/weights/gpu.py)"
    )
    pause_mode: Literal["keep", "wait", "abort"] = Field(
        default="keep", description="What in-flight requests do during the update"
    )
    source: str = Field(default="", description="Free text recorded in the version history (e.g. 'trainer step 40')")
    checkpoint: str | None = Field(
        default=None,
        max_length=4096,
        description=(
            "Absolute path, on the server's host, of a checkpoint folder whose *.safetensors hold exactly these "
            "weights: a restarted server serves it as this version. Without it the version does not survive a "
            "restart (the server then refuses traffic until the next push)"
        ),
    )

    @model_validator(mode="after")
    def _fields_of_transport(self):
        if self.checkpoint is not None and not os.path.isabs(self.checkpoint):
            raise ValueError("`checkpoint` must be an absolute path of a folder on the server's host")
        if self.transport in GPU_TRANSPORTS:
            if self.tensors is None or self.buckets:
                raise ValueError(
                    f"transport {self.transport!r} carries `tensors` (names, dtype_names, shapes), not buckets"
                )
            if (self.transport == "ipc") != (self.ipc_handles is not None):
                raise ValueError("`ipc_handles` is required for transport 'ipc' and only allowed there")
            if self.ipc_handles is not None and len(self.ipc_handles) != len(self.tensors.names):
                raise ValueError(f"{len(self.ipc_handles)} ipc_handles for {len(self.tensors.names)} tensors")
        elif not self.buckets or self.tensors is not None or self.ipc_handles is not None:
            raise ValueError(f"transport {self.transport!r} carries `buckets` (at least one), not tensors")
        return self


class NCCLInitRequest(BaseModel):
    """Body of POST /flywheel/admin/weights/nccl/init: join the trainer's NCCL group (once per trainer)."""

    master_address: str = Field(description="Address of the trainer's TCPStore rendezvous (trainer is rank 0)")
    master_port: int = Field(ge=1, le=65535, description="Port of that rendezvous")
    world_size: int = Field(ge=2, description="1 trainer rank + every inference worker of this server")
    packed: bool = Field(
        default=True, description="Packed broadcast (vLLM's double-buffered chunks); must match the sender"
    )
    packed_buffer_size_bytes: int = Field(default=1 << 30, gt=0, description="Packed chunk size; must match the sender")
    packed_num_buffers: int = Field(default=2, ge=1, description="Packed buffers in flight; must match the sender")


TensorMeta = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse a safetensors header and check the file is as long as the header says.

    Only a regular file is opened (a FIFO or a device would block the update lock), and every
    failure gets the same message naming only the file, so a push cannot probe the host's files
    (their existence, size or first bytes)."""
    path = Path(path)
    refused = PushError(
        400,
        f"bucket {path.name}: not a complete safetensors file (missing, unreadable, not a regular file, or truncated)",
    )
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise refused
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even if swapped for a FIFO meanwhile
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise refused
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise refused
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise refused
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        raise refused from None
    if 8 + n + end != size:
        raise refused
    return header


def checkpoint_weight_files(folder: str) -> list[str]:
    """The *.safetensors files of a push's `checkpoint` folder; PushError(400) when there are none.

    One message for every refusal (absent, not a folder, unreadable, no weights), as for buckets: the
    route does not tell which paths exist on the host. The files are then checked like buckets."""
    path = Path(folder)
    refused = PushError(
        400,
        f"checkpoint {folder!r}: {CHECKPOINT_NOT_VISIBLE} (a restarted server could not restore this version); "
        "push without `checkpoint` to serve it until a restart only",
    )
    if not path.is_absolute():
        raise refused
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise refused
        files = sorted(str(p) for p in path.glob("*.safetensors"))
    except OSError:
        raise refused from None
    if not files:
        raise refused
    return files


def checkpoint_manifest(model_dir: str | os.PathLike) -> dict[str, TensorMeta]:
    """Names, dtypes and shapes of the tensors in an HF checkpoint folder."""
    manifest: dict[str, TensorMeta] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        for name, t in read_header(file).items():
            manifest[name] = (t["dtype"], tuple(t["shape"]))
    if not manifest:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return manifest


Entry = tuple[str, str, tuple[int, ...], int, str]  # name, safetensors dtype, shape, bytes, where it came from


def validate_tensors(entries: Iterable[Entry], manifest: dict[str, TensorMeta], tied_lm_head: bool = False) -> dict:
    """Check a whole push (any transport) against the served manifest; raise PushError(400) on the first problem."""
    seen: dict[str, str] = {}
    total = 0
    for name, dtype, shape, nbytes, where in entries:
        if name == "lm_head.weight" and tied_lm_head and name not in manifest:
            continue  # tied to the embeddings: the server ignores it, as vLLM's loader does
        if name not in manifest:
            raise PushError(400, f"unknown tensor {name!r} in {where}: the served model has no such weight")
        if name in seen:
            raise PushError(400, f"tensor {name!r} appears twice ({seen[name]} and {where})")
        want_dtype, want_shape = manifest[name]
        if tuple(shape) != want_shape:
            raise PushError(400, f"tensor {name!r}: shape {tuple(shape)} != served {want_shape}")
        if (want_dtype in FLOAT_DTYPES) != (dtype in FLOAT_DTYPES) or (
            want_dtype not in FLOAT_DTYPES and dtype != want_dtype
        ):
            raise PushError(400, f"tensor {name!r}: dtype {dtype} cannot replace served {want_dtype}")
        seen[name] = where
        total += nbytes
    missing = sorted(set(manifest) - set(seen))
    if missing:
        raise PushError(
            400,
            f"push is missing {len(missing)} of {len(manifest)} tensors (first: {missing[0]!r}); pushes must be "
            "complete",
        )
    return {"tensors": len(seen), "bytes": total}


def bucket_entries(paths: list[str]) -> Iterable[Entry]:
    for path in paths:
        for name, t in read_header(path).items():
            yield name, t["dtype"], tuple(t["shape"]), t["data_offsets"][1] - t["data_offsets"][0], Path(path).name


def tensor_list_entries(tensors: TensorList) -> Iterable[Entry]:
    for i, (name, dtype, shape) in enumerate(zip(tensors.names, tensors.dtype_names, tensors.shapes)):
        st_dtype, itemsize = TORCH_DTYPES[dtype]
        numel = 1
        for dim in shape:
            numel *= dim
        yield name, st_dtype, tuple(shape), numel * itemsize, f"tensors[{i}]"


def validate_buckets(paths: list[str], manifest: dict[str, TensorMeta], tied_lm_head: bool = False) -> dict:
    return validate_tensors(bucket_entries(paths), manifest, tied_lm_head)
