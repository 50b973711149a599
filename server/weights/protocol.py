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
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

ADMIN_PREFIX = "/flywheel/admin/weights"
SHA_HEADER = "x-flywheel-sha256"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER_BYTES = 100 * 2**20


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


class PushRequest(BaseModel):
    """Body of POST /flywheel/admin/weights/push."""

    version: int = Field(description="The version this push creates; must be newer than the served one")
    transport: Literal["shm", "http"] = Field(description="How the buckets arrived")
    buckets: list[BucketRef] = Field(min_length=1, description="All buckets of the push")
    push_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="http transport: the upload id")
    pause_mode: Literal["keep", "wait", "abort"] = Field(default="keep", description="What in-flight requests do during the update")
    source: str = Field(default="", description="Free text recorded in the version history (e.g. 'trainer step 40')")


TensorMeta = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse a safetensors header and check the file is as long as the header says."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise PushError(400, f"bucket {path.name}: {size} bytes, too short to be safetensors")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise PushError(400, f"bucket {path.name}: truncated or not safetensors (header of {n} bytes in a {size}-byte file)")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise PushError(400, f"bucket {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PushError(400, f"bucket {path.name}: header is not JSON (not a safetensors file)") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise PushError(400, f"bucket {path.name}: truncated ({size} bytes, header describes {8 + n + end})")
    return header


def checkpoint_manifest(model_dir: str | os.PathLike) -> dict[str, TensorMeta]:
    """Names, dtypes and shapes of the tensors in an HF checkpoint folder."""
    manifest: dict[str, TensorMeta] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        for name, t in read_header(file).items():
            manifest[name] = (t["dtype"], tuple(t["shape"]))
    if not manifest:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return manifest


def validate_buckets(paths: list[str], manifest: dict[str, TensorMeta], tied_lm_head: bool = False) -> dict:
    """Check a whole push against the served manifest; raise PushError(4xx) on the first problem."""
    seen: dict[str, str] = {}
    total = 0
    for path in paths:
        for name, t in read_header(path).items():
            if name == "lm_head.weight" and tied_lm_head and name not in manifest:
                continue  # tied to the embeddings: the server ignores it, as vLLM's loader does
            if name not in manifest:
                raise PushError(400, f"unknown tensor {name!r} in {Path(path).name}: the served model has no such weight")
            if name in seen:
                raise PushError(400, f"tensor {name!r} appears in two buckets ({seen[name]} and {Path(path).name})")
            want_dtype, want_shape = manifest[name]
            if tuple(t["shape"]) != want_shape:
                raise PushError(400, f"tensor {name!r}: shape {tuple(t['shape'])} != served {want_shape}")
            if (want_dtype in FLOAT_DTYPES) != (t["dtype"] in FLOAT_DTYPES) or (
                    want_dtype not in FLOAT_DTYPES and t["dtype"] != want_dtype):
                raise PushError(400, f"tensor {name!r}: dtype {t['dtype']} cannot replace served {want_dtype}")
            seen[name] = Path(path).name
            total += t["data_offsets"][1] - t["data_offsets"][0]
    missing = sorted(set(manifest) - set(seen))
    if missing:
        raise PushError(400, f"push is missing {len(missing)} of {len(manifest)} tensors (first: {missing[0]!r}); pushes must be complete")
    return {"tensors": len(seen), "bytes": total}
