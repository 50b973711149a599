"""GPU only: real CUDA-IPC handles survive Flywheel's JSON codec (server/weights/gpu.py) into another process.

Needs only torch with CUDA (no vLLM, no pydantic: the GPU machine has neither), so it is the part of
the ipc transport that can be exercised there. Run: `python -m pytest -m gpu tests/test_weights_gpu_ipc.py`
or, without pytest, `python tests/test_weights_gpu_ipc.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)

from flywheel.server.weights.gpu import encode_ipc_args, require_cuda, tensor_list  # noqa: E402

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from torch.multiprocessing.reductions import rebuild_cuda_tensor
from flywheel.server.weights.gpu import decode_ipc_args
body = json.loads(sys.stdin.read())
here = str(torch.cuda.get_device_properties(0).uuid)
out = {}
for name, h in zip(body["tensors"]["names"], body["ipc_handles"]):
    uuid, args = decode_ipc_args(h)
    assert uuid == here, (uuid, here)
    t = rebuild_cuda_tensor(*args)
    out[name] = [float(t.float().sum()), list(t.shape), str(t.dtype)]
print(json.dumps(out))
"""


@pytest.mark.gpu
def test_real_ipc_handles_round_trip_through_json():
    from torch.multiprocessing.reductions import reduce_tensor

    g = torch.Generator(device="cuda").manual_seed(0)
    sd = {
        "a": torch.randn(64, 32, device="cuda", generator=g),
        "b": torch.randn(128, device="cuda", generator=g).bfloat16(),
        "c": torch.randn(8, 8, device="cuda", generator=g)[:, :4].contiguous(),
    }
    require_cuda(sd, "ipc")
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    pairs = [(n, t.contiguous()) for n, t in sd.items()]
    body = {
        "tensors": tensor_list(pairs),  # the fields gpu_client.gpu_commit_body adds for ipc
        "ipc_handles": [encode_ipc_args(reduce_tensor(t)[1], uuid) for _, t in pairs],
    }
    torch.cuda.synchronize()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, ROOT], input=json.dumps(body), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    for n, t in sd.items():
        assert got[n][1] == list(t.shape) and got[n][2] == str(t.dtype)
        assert abs(got[n][0] - float(t.float().sum())) < 1e-3, (n, got[n])
    print("IPC codec OK on", torch.cuda.get_device_name(0), "torch", torch.__version__)


if __name__ == "__main__":
    test_real_ipc_handles_round_trip_through_json()
