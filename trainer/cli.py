"""`flywheel train`: CPT / SFT / DPO / GRPO on files or the rollout queue; `plot` and `convert` subcommands.

flywheel train --objective sft --data chats.jsonl --model tiny-qwen3 --run-dir runs/sft --max-steps 50
flywheel train --config loop.yaml --resume              # continue the latest checkpoint in run_dir
flywheel train dpo --from-feedback redis://127.0.0.1:6379/0   # DPO on users' ratings (POST /v1/feedback)
flywheel train plot runs/sft                            # PNG curves into runs/sft/plots/
flywheel train convert ...                              # HF <-> megatron (trainer/megatron/convert.py)
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from flywheel.server.errors import UserError
from flywheel.trainer.config import TrainConfig

Config = TrainConfig


def run(config: TrainConfig) -> int:
    from flywheel.trainer.data import DataError
    from flywheel.trainer.train import train

    try:
        state = train(config)
    except DataError as exc:
        raise UserError(str(exc)) from None
    print(
        f"trained {state.step} steps, {state.tokens_trained} tokens; checkpoints in "
        f"{Path(config.run_dir) / 'checkpoints'}"
    )
    return 0


class PlotConfig(BaseModel):
    """Plot a run's metrics.jsonl as PNG curves."""

    run_dir: Path = Field(description="Run directory holding metrics.jsonl", json_schema_extra={"positional": True})
    out_dir: Path | None = Field(default=None, description="Where the PNGs go (default: RUN_DIR/plots)")


def run_plot(config: PlotConfig) -> int:
    """Write PNG curves (loss, reward, KL, LR, throughput) of a training run."""
    from flywheel.trainer.plot import plot_run

    for path in plot_run(config.run_dir, config.out_dir):
        print(path)
    return 0


class MergeConfig(BaseModel):
    """Merge a LoRA adapter into its base model: an HF folder that serves like a full model."""

    adapter: Path = Field(
        description="Adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a checkpoint's adapter/"
    )
    model: str = Field(description="The base model the adapter was trained on (HF folder or bundled name)")
    out: Path = Field(description="Destination folder (created; must not exist)")


def run_merge(config: MergeConfig) -> int:
    """Write base + adapter as one merged HF folder."""
    import torch

    from flywheel.trainer.hf_backend import merged_state_dict, with_lora
    from flywheel.trainer.policy_interface import LoraConfig, resolve_model_path

    if config.out.exists():
        raise UserError(f"{config.out} exists; choose a new --out")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = resolve_model_path(config.model)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = with_lora(model, LoraConfig(rank=1), str(config.adapter))  # rank etc. come from the adapter
    peft_model.get_base_model().save_pretrained(
        config.out, state_dict=merged_state_dict(peft_model), safe_serialization=True
    )
    AutoTokenizer.from_pretrained(base_path).save_pretrained(config.out)
    print(config.out)
    return 0


class DpoTrainConfig(TrainConfig):
    """`flywheel train dpo`: TrainConfig with the dpo objective (e.g. `--from-feedback redis://...`)."""

    objective: Literal["dpo"] = Field(default="dpo", description="Training objective (dpo for this subcommand)")


def run_dpo(config: DpoTrainConfig) -> int:
    """Train DPO on preference files (--data) or on the server's user feedback (--from-feedback REDIS_URL)."""
    return run(config)


SUBCOMMANDS: dict = {
    "plot": (PlotConfig, run_plot),
    "dpo": (DpoTrainConfig, run_dpo),
    "merge": (MergeConfig, run_merge),
}

# The megatron developer owns conversion (trainer/megatron/convert_cli.py: Config + run); expose it when present.
if (
    importlib.util.find_spec("flywheel.trainer.megatron") is not None
    and importlib.util.find_spec("flywheel.trainer.megatron.convert_cli") is not None
):
    _convert = importlib.import_module("flywheel.trainer.megatron.convert_cli")
    SUBCOMMANDS["convert"] = (_convert.Config, _convert.run)
