"""The transformers backend: an HF AutoModelForCausalLM behind the Policy protocol (trainer/policy_interface.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.server.errors import UserError
from flywheel.trainer.policy_interface import IGNORE, LoraConfig, PolicyConfig, resolve_model_path


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
        self.lora = config.lora
        if config.lora is not None:
            self.model = with_lora(self.model, config.lora, config.adapter)
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
        """The full HF-named weights; with LoRA the merged W + scale * B @ A (what a full push serves)."""
        if self.lora is not None:
            return merged_state_dict(self.model)
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the same tensor as embed_tokens; HF and vLLM re-tie on load
        return state

    def adapter_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """LoRA only: the adapter's tensors (PEFT names) and its adapter_config.json, what vLLM loads."""
        from peft import get_peft_model_state_dict

        if self.lora is None:
            raise UserError("this policy has no LoRA adapter (train with --lora-rank)")
        tensors = {k: v.detach() for k, v in get_peft_model_state_dict(self.model).items()}
        return tensors, self.model.peft_config["default"].to_dict()

    def save_hf(self, directory: Path) -> None:
        """An HF folder that serves as is; with LoRA the merged weights plus the adapter in adapter/."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            base = self.model.get_base_model()
            base.save_pretrained(directory, state_dict=self.state_dict_hf(), safe_serialization=True)
            self.model.save_pretrained(directory / "adapter", safe_serialization=True)
        else:
            self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)


def with_lora(model, lora: LoraConfig, adapter: str | None):
    """Wrap `model` in a PEFT LoRA adapter: a fresh one (B = 0, so the policy starts equal to the base) or
    the one saved in `adapter` (a checkpoint's adapter/), trainable; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter is not None:  # its own adapter_config.json says rank, alpha and targets
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"cannot load the LoRA adapter: {adapter} has no adapter_config.json")
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in present]
    if missing:
        raise UserError(f"LoRA targets {missing} are not modules of this model; it has e.g. {sorted(present)[:12]}")
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, target_modules=lora.targets, lora_dropout=0.0)
    return get_peft_model(model, config)


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """HF names -> W + delta for every adapted module, the base tensor elsewhere (nothing is modified)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            deltas[name.removeprefix("base_model.model.") + ".weight"] = module.get_delta_weight("default").detach()
    state = {}
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        tensor = tensor.detach()
        state[name] = tensor + deltas[name].to(tensor.dtype) if name in deltas else tensor
    if getattr(peft_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state
