"""`flywheel train convert`: an HF folder <-> a megatron checkpoint folder (TP/EP-sharded), offline.

A megatron checkpoint folder holds one `mp_rank_TT_EEE/model_optim_rng.pt` per (TP rank, EP rank)
(megatron's legacy naming; the file holds {"model": state_dict}), plus `flywheel_megatron.json`
(degrees) and the HF config/tokenizer files, so that converting back needs nothing else.

    flywheel train convert --src tiny-qwen3 --dst /tmp/meg --tensor-parallel 2
    flywheel train convert --src /tmp/meg --dst /tmp/hf --to hf
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from flywheel.server.errors import UserError
from flywheel.trainer.megatron.convert import Layout, full_to_hf, hf_to_full, join_shards, shard_full
from flywheel.trainer.megatron.model import arch_from_hf

META = "flywheel_megatron.json"
# files of an HF folder that are not weights: they travel with the megatron checkpoint
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class Config(BaseModel):
    """Convert weights between an HF folder and a sharded megatron checkpoint folder."""

    src: str = Field(
        description=(
            "Source: an HF folder / bundled model name (--to megatron) or a megatron checkpoint folder (--to hf)"
        )
    )
    dst: Path = Field(description="Destination folder (created; must not exist unless --overwrite)")
    to: Literal["megatron", "hf"] = Field(default="megatron", description="Direction of the conversion")
    tensor_parallel: int = Field(
        default=1, ge=1, description="TP degree of the megatron checkpoint written (--to megatron)"
    )
    expert_parallel: int = Field(
        default=1, ge=1, description="EP degree of the megatron checkpoint written (--to megatron, MoE only)"
    )
    overwrite: bool = Field(default=False, description="Replace dst if it exists")


def _rank_file(root: Path, tp: int, ep: int) -> Path:
    return root / f"mp_rank_{tp:02d}_{ep:03d}" / "model_optim_rng.pt"


def hf_to_megatron_folder(src: Path, dst: Path, tp_size: int, ep_size: int) -> None:
    from transformers import AutoModelForCausalLM

    arch = arch_from_hf(src)
    if arch.vocab_size % tp_size or arch.num_kv_heads % tp_size or arch.ffn_hidden_size % tp_size:
        raise UserError(f"tensor_parallel={tp_size} must divide vocab, KV heads and FFN size")
    if ep_size > 1 and (not arch.is_moe or arch.num_experts % ep_size):
        raise UserError(f"expert_parallel={ep_size} needs a MoE model whose expert count it divides")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype="auto").state_dict()
    full = hf_to_full(hf, arch)
    for tp in range(tp_size):
        for ep in range(ep_size):
            path = _rank_file(dst, tp, ep)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": shard_full(full, Layout.offline(arch, tp, tp_size, ep, ep_size))}, path)
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    (dst / META).write_text(
        json.dumps({"tensor_parallel": tp_size, "expert_parallel": ep_size, "source": str(src)}, indent=1)
    )


def megatron_folder_to_hf(src: Path, dst: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = json.loads((src / META).read_text())
    tp_size, ep_size = meta["tensor_parallel"], meta["expert_parallel"]
    shards = {
        (tp, ep): torch.load(_rank_file(src, tp, ep), map_location="cpu", weights_only=True)["model"]
        for tp in range(tp_size)
        for ep in range(ep_size)
    }
    arch = arch_from_hf(src)
    hf_sd = full_to_hf(join_shards(shards, tp_size, ep_size), arch)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(hf_sd.values())).dtype)
    model.load_state_dict(hf_sd, strict=True)
    model.save_pretrained(dst, safe_serialization=True)
    for name in HF_SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def run(config: Config) -> int:
    if config.dst.exists():
        if not config.overwrite:
            raise UserError(f"{config.dst} exists (pass --overwrite to replace it)")
        shutil.rmtree(config.dst)
    if config.to == "megatron":
        from flywheel.server.models import resolve_model

        try:
            src = Path(resolve_model(config.src))
        except FileNotFoundError as exc:
            raise UserError(f"{exc}") from None
        hf_to_megatron_folder(src, config.dst, config.tensor_parallel, config.expert_parallel)
    else:
        src = Path(config.src)
        if not (src / META).is_file():
            raise UserError(f"{src} is not a megatron checkpoint folder (no {META})")
        megatron_folder_to_hf(src, config.dst)
    print(f"wrote {config.dst}")
    return 0
