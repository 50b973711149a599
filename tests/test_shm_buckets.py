"""ShmBuckets: a trainer's bucket files on /dev/shm, overwritten push after push (no server needed)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import load_file

from flywheel.server.weights.shm_buckets import PREFIX, ShmBuckets, sweep_stale


def read_back(paths) -> dict:
    out = {}
    for p in paths:
        out.update(load_file(p))
    return out


def state(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.weight": torch.randn(64, 32, generator=g).to(dtype) for i in range(6)}
    sd["norm.weight"] = torch.randn(32, generator=g).to(dtype)
    sd["empty"] = torch.zeros(0, 4, dtype=dtype)
    sd["tied.weight"] = sd["layers.0.weight"]  # shares memory: written once, as safetensors needs
    return sd


def test_same_layout_overwrites_the_files_in_place(tmp_path):
    with ShmBuckets(root=tmp_path) as buckets:
        first = buckets.write(state(0), bucket_bytes=20_000)
        assert len(first) > 1 and buckets.reused == 0
        inodes = [p.stat().st_ino for p in first]
        second = buckets.write(state(1), bucket_bytes=20_000)
        assert second == first and [p.stat().st_ino for p in second] == inodes and buckets.reused == 1
        got, want = read_back(second), state(1)
        assert "tied.weight" not in got and set(got) == set(want) - {"tied.weight"}
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_a_new_layout_writes_new_files(tmp_path):
    with ShmBuckets(root=tmp_path) as buckets:
        buckets.write(state(0), bucket_bytes=20_000)
        got = read_back(buckets.write(state(2, torch.bfloat16), bucket_bytes=20_000))
        assert buckets.reused == 0 and got["norm.weight"].dtype == torch.bfloat16
        assert torch.equal(got["norm.weight"], state(2, torch.bfloat16)["norm.weight"])
        smaller = {k: v for k, v in state(3).items() if k != "layers.5.weight"}
        got = read_back(buckets.write(smaller, bucket_bytes=20_000))
        assert buckets.reused == 0 and "layers.5.weight" not in got


def test_discard_after_a_failed_push_and_close_removes_the_folder(tmp_path):
    buckets = ShmBuckets(root=tmp_path)
    paths = buckets.write(state(0), bucket_bytes=20_000)
    buckets.discard()  # what push_weights does when the push raised
    assert not any(p.exists() for p in paths)
    buckets.write(state(1), bucket_bytes=20_000)
    assert buckets.reused == 0
    buckets.close()
    assert not buckets.folder.exists()


def test_folders_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{PREFIX}{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "bucket-00000.safetensors").write_bytes(b"x" * 10)
    with ShmBuckets(root=tmp_path) as live:
        assert not stale.exists() and live.folder.exists()
        assert sweep_stale(tmp_path) == []  # this process is alive: its folder stays
        assert live.folder.exists()


def test_push_weights_drops_the_files_when_the_push_fails(tmp_path):
    from flywheel.server.weights.client import push_weights

    with ShmBuckets(root=tmp_path) as buckets:
        with pytest.raises(httpx.ConnectError):  # nothing listens on this port
            push_weights("http://127.0.0.1:9", state(0), 1, "token", transport="shm", buckets=buckets, timeout=2)
        assert buckets.files == [] and list(buckets.folder.iterdir()) == []
