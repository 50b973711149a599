"""What every backend implements and takes: the Policy protocol, its PolicyConfig and ParallelConfig.

The recipe (trainer/train.py) never touches a model class. It asks trainer/backend.py's
`build_policy(PolicyConfig)` for a `Policy` and uses only the methods below. Both backends
(trainer/hf_backend.py, trainer/megatron/) import this module and nothing of each other or of the
registry, so no backend module sits in an import circle.

Batch layout every backend accepts (built by trainer/data.py):
    input_ids     [B, T] long   token ids; several documents may be packed in one row
    position_ids  [B, T] long   restart at 0 at every document start. A restart is the ONLY
                                document-boundary signal: no token attends across one (HF derives a
                                block-diagonal causal mask from it; megatron builds cu_seqlens from it).
                                Padding is a document of its own whose targets are IGNORE.
    targets       [B, T] long   targets[b, t] is the token predicted at position t (the next token
                                of the same document), or IGNORE (-100) where no loss/logprob is wanted.

`forward_logprobs` returns log p(targets[b, t] | tokens of that document up to t) as float32 [B, T],
0.0 where targets == IGNORE, computed from logits / temperature so it compares with the server's
processed behaviour logprobs. It keeps the autograd graph (call under torch.no_grad() for
reference/behaviour passes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # annotations only: configs import this module and must not pull in torch
    import torch

IGNORE = -100


class ParallelConfig(BaseModel):
    """Model-parallel degrees: the one parallel config of both backends, the CLI (`--parallel.tensor 2`),
    YAML (`parallel: {tensor: 2}`) and the megatron internals (trainer/megatron/parallel.py, model.py).

    Only the megatron backend splits the model; the transformers backend runs one process and refuses
    degrees above 1. Data parallelism takes the remaining ranks: world = tensor * pipeline * data, and
    `expert` must divide tensor * data (experts are split over ranks that share a pipeline stage).
    """

    tensor: int = Field(
        default=1,
        ge=1,
        description=(
            "Tensor-parallel degree: attention heads, FFN columns and the vocabulary split over ranks (megatron only)"
        ),
    )
    pipeline: int = Field(
        default=1,
        ge=1,
        description=(
            "Pipeline-parallel degree: layers split into consecutive stages, trained with megatron's 1F1B schedule "
            "(megatron only)"
        ),
    )
    expert: int = Field(
        default=1, ge=1, description="Expert-parallel degree for MoE models: experts split over ranks (megatron only)"
    )

    # megatron's own names for the same three numbers (trainer/megatron/model.py and bench/ read them)
    @property
    def tensor_parallel(self) -> int:
        return self.tensor

    @property
    def pipeline_parallel(self) -> int:
        return self.pipeline

    @property
    def expert_parallel(self) -> int:
        return self.expert

    @property
    def splits_model(self) -> bool:
        return self.tensor * self.pipeline * self.expert > 1


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(BaseModel):
    """A LoRA adapter: W + (alpha / rank) * B @ A on each target projection; only A and B train."""

    rank: int = Field(gt=0, le=256, description="Adapter rank r (A is r x in, B is out x r)")
    alpha: float | None = Field(
        default=None, gt=0, description="Scale numerator: the update is (alpha / rank) * B @ A; default 2 x rank"
    )
    targets: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="Module names that get an adapter: attention and MLP projections by default (what vLLM serves)",
    )

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class PolicyConfig(BaseModel):
    """What a backend needs to build a trainable policy."""

    backend: Literal["transformers", "megatron"] = Field(default="transformers", description="Model implementation")
    model: str = Field(description="HF folder (or bundled model name) to start from")
    bf16: bool = Field(default=False, description="Keep weights and compute in bfloat16 (slow on CPU: fp32 there)")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory")
    compile: bool = Field(
        default=False,
        description="torch.compile every transformer layer (regional; shapes go dynamic after the first change). "
        "On an H200 the megatron backend trains 1.5-1.9x faster with it (bench/results/train_speed.json); "
        "the first steps pay the compilation",
    )
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Model-parallel degrees (megatron)")
    seed: int = Field(default=0, description="Seed of torch's and megatron's model-parallel RNGs at build time")
    lora: LoraConfig | None = Field(
        default=None, description="Train a LoRA adapter instead of every weight (None: full)"
    )
    adapter: str | None = Field(
        default=None, description="LoRA adapter folder to resume from (a checkpoint's adapter/); None: a fresh adapter"
    )


@runtime_checkable
class Policy(Protocol):
    """A trainable causal LM seen through HF names. Keep this small: two backends implement it."""

    def forward_logprobs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """Per-token log-probabilities of `targets` (float32 [B, T], 0 where IGNORE); see module docstring."""
        ...

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The trainable parameters this rank owns (what the optimizer steps)."""
        ...

    def train(self, mode: bool = True) -> object:
        """Switch dropout etc. on/off like nn.Module.train."""
        ...

    def finalize_grads(self) -> None:
        """Reduce gradients across ranks after the last backward of a step (HF single process: no-op)."""
        ...

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the global gradient norm (over all model-parallel shards) and return the norm before clipping."""
        ...

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        """Full weights under HF names (gathered; on model-parallel runs non-zero ranks may return {})."""
        ...

    def save_hf(self, directory: Path) -> None:
        """Write an HF folder (config.json + safetensors + tokenizer) that `flywheel serve --model` loads."""
        ...


def resolve_model_path(model: str) -> Path:
    """A bundled model name or an HF folder -> the folder (what both backends load from)."""
    from flywheel.server.models import resolve_model

    return Path(resolve_model(model))
