"""Wire formats of the GPU transports, shared by the trainer side (gpu_client.py) and the worker.

Both GPU transports are vLLM's own engines (vllm/distributed/weight_transfer/):
  nccl : the trainer is rank 0 of an NCCL group with every inference worker and broadcasts the
         tensors (vLLM's packed, double-buffered broadcast by default); the commit names them.
  ipc  : trainer and server share a GPU host; the commit carries one CUDA-IPC handle per tensor
         and the worker maps the trainer's memory directly (no copy until load_weights).

vLLM's own HTTP client ships IPC handles as base64 *pickle* (and needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1 to read them). Flywheel never unpickles: a handle is the
argument tuple of torch's `rebuild_cuda_tensor`, which holds only ints, bools, bytes, a dtype and
two classes, so it is encoded as JSON with the bytes in base64 (a few dozen bytes per tensor, not
weights) and the classes and dtype from fixed allow-lists.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import torch

# torch dtype name -> (safetensors dtype, bytes per element): the dtypes a GPU push may name
TORCH_DTYPES = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}

# the fields of torch.multiprocessing.reductions.rebuild_cuda_tensor, in order
IPC_FIELDS = (
    "tensor_cls",
    "tensor_size",
    "tensor_stride",
    "tensor_offset",
    "storage_cls",
    "dtype",
    "storage_device",
    "storage_handle",
    "storage_size_bytes",
    "storage_offset_bytes",
    "requires_grad",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
)
_BYTES = {"storage_handle", "ref_counter_handle", "event_handle"}
_INTS = {"tensor_offset", "storage_device", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset"}
_BOOLS = {"requires_grad", "event_sync_required"}
TENSOR_CLASSES = {"Tensor": torch.Tensor, "Parameter": torch.nn.Parameter}
STORAGE_CLASSES = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}


class HandleError(ValueError):
    """An IPC handle that is not one torch's rebuild_cuda_tensor could have produced."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype} cannot be pushed (allowed: {sorted(TORCH_DTYPES)})")
    return name


def tensor_list(weights: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """The `tensors` field of a GPU push: names, torch dtype names and shapes, in send order."""
    names, dtypes, shapes = [], [], []
    for name, t in weights:
        names.append(name)
        dtypes.append(dtype_name(t.dtype))
        shapes.append(list(t.shape))
    return {"names": names, "dtype_names": dtypes, "shapes": shapes}


def require_cuda(weights: dict, transport: str) -> None:
    """GPU transports move device memory: refuse CPU tensors with a clear error (use shm/http for those)."""
    if not weights:
        raise ValueError("nothing to push: the state dict is empty")
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.device.type != "cuda":
            raise ValueError(
                f"transport={transport!r} moves CUDA tensors, but {name!r} is on {t.device}; "
                f"move the model to the GPU or use transport='shm' / 'http'"
            )


def encode_ipc_args(args: tuple, gpu_uuid: str) -> dict:
    """JSON form of one reduce_tensor(t)[1] tuple, keyed by the GPU it lives on."""
    if len(args) != len(IPC_FIELDS):
        raise HandleError(f"an IPC handle has {len(IPC_FIELDS)} fields, got {len(args)}")
    out: dict = {"gpu_uuid": str(gpu_uuid)}
    for key, value in zip(IPC_FIELDS, args):
        if key == "tensor_cls":
            value = next((k for k, c in TENSOR_CLASSES.items() if c is value), None)
        elif key == "storage_cls":
            value = next((k for k, c in STORAGE_CLASSES.items() if c is value), None)
        elif key == "dtype":
            value = dtype_name(value)
        elif key in ("tensor_size", "tensor_stride"):
            value = [int(v) for v in value]
        elif key in _BYTES:
            value = None if value is None else base64.b64encode(bytes(value)).decode()
        if value is None and key not in ("event_handle",):
            raise HandleError(f"IPC handle field {key!r} cannot be encoded")
        out[key] = value
    return out


def decode_ipc_args(handle: dict) -> tuple[str, tuple]:
    """(gpu_uuid, rebuild_cuda_tensor args) from the JSON form; raises HandleError on anything unexpected."""
    if not isinstance(handle, dict):
        raise HandleError("an IPC handle must be a JSON object")
    missing = [k for k in ("gpu_uuid", *IPC_FIELDS) if k not in handle]
    if missing:
        raise HandleError(f"IPC handle lacks {missing}")
    args = []
    for key in IPC_FIELDS:
        value = handle[key]
        try:
            if key == "tensor_cls":
                value = TENSOR_CLASSES[value]
            elif key == "storage_cls":
                value = STORAGE_CLASSES[value]
            elif key == "dtype":
                if value not in TORCH_DTYPES:
                    raise KeyError(value)
                value = getattr(torch, value)
            elif key == "tensor_size":
                value = torch.Size(int(v) for v in value)
            elif key == "tensor_stride":
                value = tuple(int(v) for v in value)
            elif key in _BYTES:
                value = None if value is None and key == "event_handle" else base64.b64decode(value, validate=True)
            elif key in _INTS:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise TypeError(value)
            elif key in _BOOLS:
                if not isinstance(value, bool):
                    raise TypeError(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise HandleError(f"IPC handle field {key!r}: bad value {value!r} ({exc.__class__.__name__})") from None
        args.append(value)
    return str(handle["gpu_uuid"]), tuple(args)


def check_ipc_handles(handles: list[dict], tensors) -> None:
    """Each handle must describe the tensor the commit names at its index (shape and dtype)."""
    for i, (handle, shape, dtype) in enumerate(zip(handles, tensors.shapes, tensors.dtype_names)):
        _, args = decode_ipc_args(handle)
        if list(args[1]) != list(shape) or args[5] != getattr(torch, dtype):
            raise HandleError(
                f"ipc_handles[{i}] describes {list(args[1])} {args[5]}, "
                f"but tensors[{i}] ({tensors.names[i]!r}) is {list(shape)} {dtype}"
            )
