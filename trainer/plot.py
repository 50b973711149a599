"""`flywheel train plot RUN_DIR`: one PNG of curves per group of metrics."""

from __future__ import annotations

from pathlib import Path

from flywheel.trainer.metrics import read_metrics

PANELS = [
    ("loss", ["loss"]),
    ("reward", ["reward_mean", "accuracy", "margin_mean"]),
    ("kl", ["kl", "clip_fraction", "tis_weight_mean"]),
    ("optim", ["lr", "grad_norm"]),
    ("throughput", ["tokens_per_s"]),
    ("data", ["dropped_stale", "zero_variance_groups", "pushed_version"]),
]


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = Path(out_dir or Path(run_dir) / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in PANELS:
        present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
        if not present:
            continue
        fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), squeeze=False)
        for ax, key in zip(axes[:, 0], present):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{Path(run_dir).name}: {name}")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
