"""Checkpoints: an HF folder `flywheel serve --model` loads, plus what `--resume` needs to continue exactly.

    run_dir/checkpoints/step_000040/
        config.json, model.safetensors, tokenizer files     <- policy.save_hf (servable as is)
        trainer_state/rank0.pt                               <- optimizer, scheduler, torch RNG (per rank)
        trainer_state/state.json                             <- TrainState: step, cursor, trained ids, pushed version
    run_dir/checkpoints/latest                               <- name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed, and `latest` is rewritten last, so a
crash mid-save leaves the previous checkpoint as the one resumed from.

This module owns that layout: it writes it and it reads it (`latest_checkpoint`,
`latest_train_state`, `read_train_state`); `flywheel up` reads the trainer's progress and pushed
version through it. torch and numpy are imported inside the functions that save or restore
tensors, so reading a TrainState (clients do) does not import them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from flywheel.server.errors import UserError

MAX_REMEMBERED_IDS = 200_000
LATEST = "latest"  # run_dir/checkpoints/latest: the newest complete checkpoint's folder name
STATE_DIR = "trainer_state"
STATE_FILE = "state.json"  # TrainState, in STATE_DIR
LAYOUT_FILE = "layout.json"  # backend and parallel degrees, in STATE_DIR


class TrainState(BaseModel):
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = Field(default=0, description="Optimizer steps completed")
    pushed_version: int = Field(
        default=0, description="Last weight version pushed to the server (0: the served checkpoint)"
    )
    trained_ids: list[str] = Field(
        default_factory=list, description="Recent queue record ids already trained (idempotency)"
    )
    dropped_stale: int = Field(default=0, description="Rollouts dropped for being older than max_staleness")
    skipped_duplicates: int = Field(
        default=0, description="Redelivered records skipped because they were already trained"
    )
    tokens_trained: int = Field(default=0, description="Target tokens trained on so far")

    def remember(self, ids: list[str]) -> None:
        self.trained_ids.extend(ids)
        del self.trained_ids[:-MAX_REMEMBERED_IDS]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def _rng_state() -> dict:
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    run_dir: Path, policy, optimizer, scheduler, state: TrainState, keep: int = 2, layout: dict | None = None
) -> Path:
    import torch

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp_step_{state.step:06d}"
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    policy.save_hf(tmp)  # every rank calls it: model-parallel backends gather inside
    (tmp / STATE_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        tmp / STATE_DIR / f"rank{_rank()}.pt",
    )
    _barrier()  # every rank's state is in tmp before rank 0 renames it (else a rank's file can miss the rename)
    if _rank() == 0:
        (tmp / STATE_DIR / STATE_FILE).write_text(state.model_dump_json())
        if layout is not None:
            (tmp / STATE_DIR / LAYOUT_FILE).write_text(json.dumps(layout))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / f"{LATEST}.tmp").write_text(final.name)
        os.replace(root / f"{LATEST}.tmp", root / LATEST)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    _barrier()  # nobody reads `latest` or starts the next save before the rename
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a trainer's run_dir, or None before the first."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.exists() else None


def read_train_state(checkpoint: Path) -> TrainState:
    """The TrainState saved in a checkpoint folder (step, pushed version, trained ids, counters)."""
    return TrainState.model_validate_json((Path(checkpoint) / STATE_DIR / STATE_FILE).read_text())


def latest_train_state(run_dir: Path) -> tuple[Path, TrainState] | None:
    """(newest checkpoint, its TrainState) of a trainer's run_dir, or None when there is none yet."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not (checkpoint / STATE_DIR / STATE_FILE).is_file():
        return None
    return checkpoint, read_train_state(checkpoint)


def check_resume_layout(checkpoint: Path, layout: dict) -> None:
    """Refuse to resume optimizer state written under another backend or parallel layout.

    The weights are full HF tensors and load under any layout, but each rank's optimizer state is
    its own shard: with the same world size and another TP degree, every rank{r}.pt still exists and
    would be loaded into the wrong parameters. Checkpoints written before layout.json was saved are not checked."""
    path = checkpoint / STATE_DIR / LAYOUT_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    changed = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        raise UserError(
            f"{checkpoint} was written with {saved}; this run changes {what}. Resume with "
            f"the same backend and parallel degrees, or start a new run with --model {checkpoint} (weights only)"
        )


def load_trainer_state(checkpoint: Path, optimizer, scheduler) -> TrainState:
    """Restore optimizer, scheduler and RNG in place; return the TrainState."""
    import torch

    path = checkpoint / STATE_DIR / f"rank{_rank()}.pt"
    if not path.is_file():
        world = torch.distributed.get_world_size() if _distributed() else 1
        raise UserError(
            f"{path} is missing: resume with the world size and parallel "
            f"degrees the checkpoint was written with (this run has {world} ranks)"
        )
    blob = torch.load(path, weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return read_train_state(checkpoint)
