"""Weight transports without a server: bucket files, the GPU transports' argument handling, config -> vLLM args.

No GPU here (and no vLLM on the GPU machine), so nccl/ipc are checked up to the point where bytes
would move: the commit bodies and metadata, the IPC handle codec, refusals, the server-side
validation they share with shm/http, and the backend the server asks vLLM for.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from flywheel.server.config import ServeConfig
from flywheel.server.weights.client import push_weights, write_safetensors
from flywheel.server.weights.gpu import (
    IPC_FIELDS,
    HandleError,
    check_ipc_handles,
    decode_ipc_args,
    encode_ipc_args,
    require_cuda,
    tensor_list,
)
from flywheel.server.weights.gpu_client import NCCLSender, gpu_commit_body
from flywheel.server.weights.protocol import (
    NCCLInitRequest,
    PushError,
    PushRequest,
    TensorList,
    checkpoint_manifest,
    tensor_list_entries,
    validate_buckets,
    validate_tensors,
)


def small_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(8),
        "model.step": torch.tensor(3, dtype=torch.int64),
    }


@pytest.fixture
def manifest(tmp_path) -> dict:
    save_file(small_model(), str(tmp_path / "model.safetensors"))
    return checkpoint_manifest(tmp_path)


def test_write_safetensors_is_read_back_exactly_by_safetensors_and_the_worker(tmp_path):
    from flywheel.server.weights.worker import read_files

    sd = {**small_model(), "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    path = tmp_path / "b.safetensors"
    write_safetensors(sd, path)
    for name, t in [*load_file(str(path)).items(), *read_files([str(path)])]:
        assert t.dtype == sd[name].dtype and t.shape == sd[name].shape and torch.equal(t, sd[name]), name


def test_bucket_and_gpu_pushes_share_one_validation(tmp_path, manifest):
    sd = small_model()
    write_safetensors(sd, tmp_path / "push.safetensors")
    from_files = validate_buckets([str(tmp_path / "push.safetensors")], manifest)
    from_list = validate_tensors(tensor_list_entries(TensorList(**tensor_list(sd.items()))), manifest)
    assert from_files == from_list == {"tensors": 4, "bytes": 16 * 8 * 4 + 8 * 8 * 2 + 8 * 4 + 8}
    q = "model.layers.0.self_attn.q_proj.weight"
    bad = {
        "wrong shape": {**sd, q: torch.zeros(8, 7)},
        "unknown name": {**sd, "model.layers.9.x": torch.zeros(2)},
        "missing": {k: v for k, v in sd.items() if k != "model.norm.weight"},
        "int where float": {**sd, q: torch.zeros(8, 8, dtype=torch.int32)},
        "float where int": {**sd, "model.step": torch.tensor(3.0)},
    }
    for label, weights in bad.items():
        with pytest.raises(PushError) as info:
            validate_tensors(tensor_list_entries(TensorList(**tensor_list(weights.items()))), manifest)
        assert info.value.status == 400, label
    # a float dtype may replace another (the server casts), and a tied lm_head is ignored
    cast = {**sd, q: sd[q].float(), "lm_head.weight": torch.zeros(16, 8)}
    assert (
        validate_tensors(tensor_list_entries(TensorList(**tensor_list(cast.items()))), manifest, tied_lm_head=True)[
            "tensors"
        ]
        == 4
    )


def test_push_request_fields_follow_the_transport():
    tensors = {"names": ["a"], "dtype_names": ["float32"], "shapes": [[2]]}
    PushRequest(version=1, transport="nccl", tensors=tensors)
    PushRequest(version=1, transport="shm", buckets=[{"path": "/dev/shm/x"}])
    refused = [
        {"transport": "grpc", "tensors": tensors},  # no such transport
        {"transport": "nccl"},  # names nothing
        {"transport": "nccl", "tensors": tensors, "buckets": [{"path": "/x"}]},
        {"transport": "nccl", "tensors": tensors, "ipc_handles": [{}]},
        {"transport": "ipc", "tensors": tensors},  # no handles
        {"transport": "ipc", "tensors": tensors, "ipc_handles": [{}, {}]},  # 2 handles, 1 tensor
        {"transport": "shm", "buckets": []},
        {"transport": "http", "buckets": [{"index": 0}], "tensors": tensors},
        {
            "transport": "nccl",
            "tensors": {**tensors, "dtype_names": ["float33"]},
        },  # getattr(torch, ...) is never reached
        {"transport": "nccl", "tensors": {**tensors, "shapes": [[2], [3]]}},
        {"transport": "nccl", "tensors": {**tensors, "shapes": [[-2]]}},
    ]
    for fields in refused:
        with pytest.raises(ValidationError):
            PushRequest(version=1, **fields)


def test_gpu_commit_body_names_dtypes_and_shapes_in_send_order():
    sd = small_model()
    body = gpu_commit_body(list(sd.items()), 5, "nccl", "wait", "step 9")
    assert body == {
        "version": 5,
        "transport": "nccl",
        "pause_mode": "wait",
        "source": "step 9",
        "tensors": {
            "names": list(sd),
            "dtype_names": ["float32", "bfloat16", "float32", "int64"],
            "shapes": [[16, 8], [8, 8], [8], []],
        },
    }
    PushRequest(**body)  # what the client builds is what the server accepts
    with pytest.raises(ValueError, match="complex64"):
        tensor_list([("z", torch.zeros(2, dtype=torch.complex64))])


def test_gpu_transports_refuse_cpu_tensors_and_bad_arguments_before_any_request():
    sd = small_model()
    url = "http://127.0.0.1:9"  # nothing listens: every refusal below happens before a request
    for transport in ("nccl", "ipc"):
        with pytest.raises(ValueError, match=r"CUDA tensors, but 'model.embed_tokens.weight' is on cpu.*shm"):
            push_weights(url, sd, 1, "t", transport=transport)
        with pytest.raises(ValueError, match="not a folder"):
            push_weights(url, "/some/folder", 1, "t", transport=transport)
    with pytest.raises(ValueError, match="unknown transport 'grpc'"):
        push_weights(url, sd, 1, "t", transport="grpc")
    with pytest.raises(ValueError, match="unknown pause_mode"):
        push_weights(url, sd, 1, "t", pause_mode="later")
    with pytest.raises(ValueError, match="empty"):
        require_cuda({}, "nccl")
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        require_cuda({"w": [1.0]}, "ipc")


def test_nccl_sender_init_body_carries_the_wire_params():
    sender = NCCLSender(
        "http://h:8000/v1",
        "tok",
        master_address="10.0.0.2",
        master_port=29600,
        world_size=3,
        packed=False,
        packed_buffer_size_bytes=1 << 20,
        packed_num_buffers=3,
    )
    assert sender.url == "http://h:8000"
    assert sender.init_body() == {
        "master_address": "10.0.0.2",
        "master_port": 29600,
        "world_size": 3,
        "packed": False,
        "packed_buffer_size_bytes": 1 << 20,
        "packed_num_buffers": 3,
    }
    assert NCCLSender("http://h:8000", "tok").init_body()["packed"] is True  # vLLM's trainer default
    with pytest.raises(RuntimeError, match="not connected"):
        sender.broadcast([])
    for bad in ({"master_port": 0}, {"world_size": 1}, {"packed_num_buffers": 0}):
        with pytest.raises(ValidationError):
            NCCLInitRequest(**{"master_address": "h", "master_port": 1, "world_size": 2, **bad})


def _handle_args(shape=(4, 2), dtype=torch.float16):
    """The tuple torch's reduce_tensor returns for a CUDA tensor, with made-up handle bytes (argument handling only)."""
    return (
        torch.nn.Parameter,
        torch.Size(shape),
        (shape[1], 1),
        0,
        torch.storage.TypedStorage,
        dtype,
        0,
        b"\x01" * 64,
        16,
        0,
        False,
        b"/torch_123_ref",
        8,
        b"\x02" * 64,
        True,
    )


def test_ipc_handle_codec_matches_torch_and_never_needs_pickle():
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    assert tuple(inspect.signature(rebuild_cuda_tensor).parameters) == IPC_FIELDS
    encoded = encode_ipc_args(_handle_args(), "GPU-1234")
    wire = json.loads(json.dumps(encoded))  # plain JSON
    uuid, args = decode_ipc_args(wire)
    assert uuid == "GPU-1234" and args == _handle_args()
    assert decode_ipc_args({**wire, "event_handle": None})[1][13] is None
    for key, value in [
        ("tensor_cls", "os.system"),
        ("storage_cls", "builtins.eval"),
        ("dtype", "complex128"),
        ("storage_handle", "%%%"),
        ("storage_device", "0"),
        ("requires_grad", 1),
        ("tensor_size", ["x"]),
    ]:
        with pytest.raises(HandleError, match=key):
            decode_ipc_args({**wire, key: value})
    with pytest.raises(HandleError, match="lacks"):
        decode_ipc_args({k: v for k, v in wire.items() if k != "storage_handle"})
    with pytest.raises(HandleError):
        encode_ipc_args(_handle_args()[:-1], "GPU-1")
    # each handle must describe the tensor named at its index
    tensors = TensorList(names=["w"], dtype_names=["float16"], shapes=[[4, 2]])
    check_ipc_handles([wire], tensors)
    with pytest.raises(HandleError, match=r"tensors\[0\] \('w'\) is \[4, 3\]"):
        check_ipc_handles([wire], TensorList(names=["w"], dtype_names=["float16"], shapes=[[4, 3]]))
    with pytest.raises(HandleError, match="bfloat16"):
        check_ipc_handles([wire], TensorList(names=["w"], dtype_names=["bfloat16"], shapes=[[4, 2]]))


def _weight_transfer_arg(config: ServeConfig, cpu: bool) -> dict:
    from flywheel.server.serve import vllm_argv

    argv = vllm_argv(config, Path("/m"), "m", cpu=cpu)
    return json.loads(argv[argv.index("--weight-transfer-config") + 1])


def test_serve_config_picks_the_vllm_weight_transfer_backend():
    assert _weight_transfer_arg(ServeConfig(), cpu=True) == {"backend": "flywheel"}
    assert _weight_transfer_arg(ServeConfig(weight_transports=["shm", "http", "nccl"]), cpu=False) == {
        "backend": "flywheel_nccl"
    }
    assert _weight_transfer_arg(ServeConfig(weight_transports=["ipc"]), cpu=False) == {"backend": "flywheel_ipc"}
    with pytest.raises(ValueError, match="need a CUDA device"):
        _weight_transfer_arg(ServeConfig(weight_transports=["nccl"]), cpu=True)
    for bad in (["nccl", "ipc"], [], ["rdma"]):
        with pytest.raises(ValidationError):
            ServeConfig(weight_transports=bad)
    assert ServeConfig(tensor_parallel_size=4).weight_workers() == 4


def test_every_backend_the_config_can_name_is_registered_in_vllms_factory():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    import flywheel.server.weights.worker  # noqa: F401  (the worker extension: importing it registers them)

    for transports in (["shm"], ["shm", "nccl"], ["ipc", "http"]):
        assert (
            ServeConfig(weight_transports=transports).weight_transfer_backend() in WeightTransferEngineFactory._registry
        )
