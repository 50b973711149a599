"""Training metrics: one JSON object per logged step in run_dir/metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flywheel.server.errors import UserError
from flywheel.server.jsonl import read_json_lines


class MetricsLog:
    """Append-only metrics sink; on resume it keeps appending to the same file."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the JSONL is the record; TensorBoard events are a view of it
                print("flywheel train: tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"no metrics.jsonl in {run_dir}")
    rows = read_json_lines(path)
    # a resumed run re-logs the steps after its checkpoint: keep the last value of each step
    by_step = {row["step"]: row for row in rows}
    return [by_step[s] for s in sorted(by_step)]
