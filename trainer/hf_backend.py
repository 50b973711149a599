"""The transformers backend: an HF AutoModelForCausalLM behind the Policy protocol (trainer/policy_interface.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.trainer.policy_interface import IGNORE, PolicyConfig, resolve_model_path


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[targets] in float32, 0 where targets == IGNORE.

    Computed as logit[target] - logsumexp(logits) so the [B, T, V] log-softmax is never materialised twice.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    safe = targets.clamp(min=0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return out.masked_fill(targets == IGNORE, 0.0)


class HFPolicy:
    """HF causal LM; packed documents are kept apart by position-id restarts (HF builds the block mask)."""

    def __init__(self, config: PolicyConfig):
        self.path = resolve_model_path(config.model)
        dtype = torch.bfloat16 if config.bf16 else torch.float32
        # sdpa honours the packed-sequence mask transformers derives from position_ids.
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, attn_implementation="sdpa")
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        if config.compile:  # the same regional compilation as the megatron backend's
            for layer in self.model.model.layers:
                layer.compile()
        self.model.train()

    def forward_logprobs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        device = self.model.device
        logits = self.model(
            input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False
        ).logits
        targets = targets.to(device)
        return token_logprobs(logits, targets, temperature)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> HFPolicy:
        self.model.train(mode)
        return self

    def finalize_grads(self) -> None:
        pass  # one process holds every parameter: nothing to reduce

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(list(self.parameters()), max_norm))

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the same tensor as embed_tokens; HF and vLLM re-tie on load
        return state

    def save_hf(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
