"""Bucket files on /dev/shm that one trainer process reuses, push after push (shm transport).

Writing a push into new tmpfs files pays for the kernel allocating every page: 0.30 s for the
538 MB of SmolLM2 in fp32 here. Writing the same layout (names, dtypes, shapes) into the files of
the previous push, through a mapping that is already populated, runs at memory speed: 0.04 s.
A trainer pushes the same layout every time, so `WeightPusher` keeps one `ShmBuckets`.

Safe to overwrite because the server is done with the files when the push answers (the worker
copies the tensors out during the apply); after a push that failed or timed out the server may
still be reading them, so the files are dropped (`discard`) and the next push writes new ones.
Folders left by a killed process are removed by the next `ShmBuckets` made on this host.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import weakref
from pathlib import Path

import torch

from flywheel.server.weights.client import _dedupe_tied, bucketize, write_safetensors

PREFIX = "flywheel-buckets-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(base: Path) -> list[Path]:
    """Remove bucket folders whose owning process is gone; returns what was removed."""
    removed = []
    for folder in base.glob(PREFIX + "*"):
        pid = folder.name.removeprefix(PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class _MappedFile:
    """One written bucket, mapped writable, with the byte range of each of its tensors."""

    def __init__(self, path: Path, names: list[str]):
        with open(path, "r+b") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
            size = os.fstat(fh.fileno()).st_size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.map = mmap.mmap(fh.fileno(), size, flags=flags) if size else None
        base = 8 + header_len
        self.path = path
        self.ranges = [(base + header[n]["data_offsets"][0], base + header[n]["data_offsets"][1]) for n in names]

    def overwrite(self, tensors: list[torch.Tensor]) -> None:
        # A plain memcpy per tensor, on this thread. (torch's copy_ splits it over OpenMP threads, and
        # right after a push vLLM's worker spin-waits on one core for ~0.5 s: the copy then waited for
        # its thread on that core, 1.0 s instead of 0.05 s, measured.)
        for (start, end), t in zip(self.ranges, tensors):
            if end > start:
                self.map[start:end] = memoryview(t.reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        if self.map is not None:
            self.map.close()


class ShmBuckets:
    """Reusable bucket files for `push_weights(..., transport="shm", buckets=ShmBuckets())`."""

    def __init__(self, root: str | os.PathLike = "/dev/shm"):
        base = Path(root)
        sweep_stale(base)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
        self.layout: list | None = None
        self.files: list[_MappedFile] = []
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self.reused = 0  # pushes that overwrote the previous files (for tests and benchmarks)

    def write(self, weights: dict, bucket_bytes: int) -> list[Path]:
        buckets = list(bucketize(_dedupe_tied(weights), bucket_bytes))
        layout = [[(name, str(t.dtype), tuple(t.shape)) for name, t in b.items()] for b in buckets]
        if layout == self.layout and all(f.path.exists() for f in self.files):
            for file, bucket in zip(self.files, buckets):
                file.overwrite(list(bucket.values()))
            self.reused += 1
            return [f.path for f in self.files]
        self.discard()
        for i, bucket in enumerate(buckets):
            path = self.folder / f"bucket-{i:05d}.safetensors"
            write_safetensors(bucket, path)
            self.files.append(_MappedFile(path, list(bucket)))
        self.layout = layout
        return [f.path for f in self.files]

    def discard(self) -> None:
        """Forget the files (the server may still map them: unlinking leaves its mapping valid)."""
        for file in self.files:
            file.close()
            file.path.unlink(missing_ok=True)
        self.files, self.layout = [], None

    def close(self) -> None:
        self.discard()
        self._cleanup()

    def __enter__(self) -> ShmBuckets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
