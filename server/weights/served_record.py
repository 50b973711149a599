"""The served version, kept on disk, so a restarted server comes back with it, not with version 0 (issue 16).

    <data_dir>/served/record.json   ServedRecord: the last published version and what serves it
    <data_dir>/served/v<N>/         full pushes: the version's weights, pinned from the checkpoint the push named
    <data_dir>/adapters/v<N>/       adapter pushes: the server's own copy of the adapter (server/weights/adapter.py)

Order of a push (the update lock held throughout): pin the named checkpoint's *.safetensors into
served/v<N> (hard links: free, and the trainer's retention, keep_checkpoints, can delete its folder
without taking the files; a copy where the data dir is on another filesystem), apply the weights,
replace record.json atomically (tmp, fsync, rename, fsync of the folder), and only then publish the
version. A crash at any point leaves record.json naming a version that was applied and whose files
are pinned. On start (server/weights/restore.py) the server applies what the record names before it
answers any request, under the recorded version.

An adapter push keeps the base weights of the full push before it (`base`: applied first on a
restart); a full push on a server that also serves an adapter records the weights only (after a
restart the adapter's name is unknown, 404, until the next adapter push: never other weights).

A push that names no checkpoint (a script's state dict, a GPU transport from a caller with no
checkpoint) is recorded as not recoverable rather than saved by the server: saving would cost a full
write of the weights on every push, and the trainer always names one. A server restarted after such
a push reports that version and refuses generation (503, saying why) until the next push; it never
serves the base weights under any version number.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

FOLDER = "served"
RECORD = "record.json"


class ServedRecord(BaseModel):
    """What serves the last published version."""

    version: int = Field(ge=1, description="The last published version")
    kind: Literal["weights", "adapter", "unrecoverable"] = Field(
        description="weights: a full push pinned in `folder`; adapter: a LoRA adapter in `folder`; unrecoverable: "
        "pushed without a checkpoint"
    )
    folder: str | None = Field(default=None, description="What a restart loads (inside the data dir)")
    base: str | None = Field(
        default=None,
        description="adapter: the pinned full weights it applies on (a full push before it); None: the starting "
        "checkpoint",
    )
    checkpoint: str | None = Field(default=None, description="The checkpoint folder the push named")
    source: str = Field(default="", description="The push's source text")
    at: float = Field(default_factory=time.time, description="Unix time it was recorded")


def record_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / FOLDER / RECORD


def read_record(data_dir: str | os.PathLike) -> ServedRecord | None:
    """The record, or None when this data dir never had a push. A record that does not parse raises
    ValueError (it was written atomically: something else wrote it)."""
    path = record_path(data_dir)
    if not path.is_file():
        return None
    return ServedRecord.model_validate_json(path.read_text())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(data_dir: str | os.PathLike, record: ServedRecord) -> None:
    """Replace the record atomically and durably: after a crash it is the old one or this one, whole."""
    path = record_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(record.model_dump_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_folder(folder: Path) -> None:
    """Every file of `folder`, and the folder itself, on disk."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def pin_checkpoint(data_dir: str | os.PathLike, version: int, files: list[str]) -> Path:
    """served/v<version>/ holding `files` (hard links, copies across filesystems), fsynced; returns it."""
    root = Path(data_dir) / FOLDER
    final, tmp = root / f"v{version}", root / f".tmp-v{version}"
    for stale in (tmp, final):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in files:
        target = tmp / Path(name).name
        try:
            os.link(name, target)
        except OSError:  # another filesystem (or links not allowed): a copy, the only cost of a pin
            shutil.copyfile(name, target)
    fsync_folder(tmp)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def unpin(data_dir: str | os.PathLike, keep: Path | None) -> None:
    """Remove every pinned version but `keep` (what the record names), and unfinished pins."""
    root = Path(data_dir) / FOLDER
    for old in [*root.glob("v*"), *root.glob(".tmp-v*")]:
        if old.is_dir() and old != keep:
            shutil.rmtree(old, ignore_errors=True)
