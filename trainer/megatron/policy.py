"""MegatronPolicy: the trainer's Policy protocol (trainer/policy_interface.py) on a megatron-core GPTModel.

Same config, same batch layout, same HF checkpoints as the transformers backend:
- built from the HF folder (config.json -> GPTModel, weights through convert.py), TP/PP/EP from
  `PolicyConfig.parallel`, launched with torchrun (gloo on CPU, NCCL on GPU);
- packed documents: a position-id restart starts a new document; the attention mask is then
  block-diagonal causal. RoPE needs no per-document positions: it only sees i - j, which is the
  same inside a document either way, and attention across documents is masked;
- log-probs through megatron's vocab-parallel cross-entropy (exact under TP: no full-vocab gather);
- gradients: megatron's DDP wrapper hard-codes CUDA, so `finalize_grads` does the reductions
  itself: q/k-layernorm grads summed over TP (each rank saw only its heads), then the mean over
  data-parallel replicas (expert weights over the expert-data-parallel group).
- MoE with TP > 1 runs sequence-parallel (megatron requires it; TE-free norms in
  sequence_parallel.py): T is padded to a multiple of TP, sequence-parallel grads summed over TP;
- pipeline parallelism: through megatron's 1F1B schedule (trainer/megatron/pipeline.py): a
  forward-only pass gives every stage the log-probs, the recipe's backward records dloss/dlogprobs,
  and `finalize_grads` runs the forward+backward schedule on the surrogate sum(logprobs * grad).
  Tied embeddings: the last stage's copy of the embedding gets the first stage's grad and vice versa.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from flywheel.trainer.megatron.convert import full_to_hf, gather_full, hf_state_dict, load_hf_state_dict
from flywheel.trainer.megatron.model import arch_from_hf, build_gpt
from flywheel.trainer.megatron.parallel import device, init_parallel
from flywheel.trainer.policy_interface import IGNORE, PolicyConfig, resolve_model_path

_TP_PARTIAL_GRADS = ("q_layernorm.weight", "k_layernorm.weight")


def document_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """megatron attention mask [B, 1, T, T] (True = masked) for packed rows; None when no row is packed."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):  # one host sync per forward; the causal fast path needs no mask
        return None
    doc = torch.cumsum(torch.cat([torch.ones_like(restarts[:, :1]), restarts], dim=1).int(), dim=1)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal
    return ~allowed[:, None]


def _logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(targets) from vocab-parallel logits [B, T, V / TP] (exact under TP: no full-vocab gather)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # a new fp32 tensor (the division copies): megatron's cross-entropy works in place on its input
    scaled = logits.float() / temperature
    logprobs = -vocab_parallel_cross_entropy(scaled, targets.clamp(min=0))
    return logprobs.masked_fill(targets == IGNORE, 0.0)


def pad_to_multiple(input_ids, position_ids, targets, multiple: int):
    """Pad T to a multiple of `multiple` with a padding document of its own (positions restart, no targets)."""
    pad = -input_ids.shape[1] % multiple
    if not pad:
        return input_ids, position_ids, targets
    fill = lambda x, v: torch.cat([x, x.new_full((x.shape[0], pad), v)], dim=1)  # noqa: E731
    positions = torch.cat(
        [position_ids, torch.arange(pad, device=position_ids.device).expand(position_ids.shape[0], pad)], 1
    )
    return fill(input_ids, 0), positions, fill(targets, IGNORE)


def _is_expert(name: str, p: torch.nn.Parameter) -> bool:
    return ".experts." in name or not getattr(p, "allreduce", True)


class MegatronPolicy:
    def __init__(self, config: PolicyConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = resolve_model_path(config.model)
        self.arch = arch_from_hf(self.path)
        init_parallel(config.parallel, seed=config.seed)
        self.dtype = torch.bfloat16 if config.bf16 else torch.float32
        if config.parallel.pipeline > 1:
            from flywheel.trainer.megatron.pipeline import apply_cpu_patches

            apply_cpu_patches()
        self.model = build_gpt(
            self.arch,
            config.parallel,
            dtype=self.dtype,
            recompute=config.gradient_checkpointing,
            compile_layers=config.compile,
        )
        hf = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype)
        load_hf_state_dict(self.model, {k: v.to(device()) for k, v in hf.state_dict().items()}, self.arch)
        del hf
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model.train()
        self.pipeline = None
        self._pending: list = []  # PP: this step's micro-batches awaiting the forward+backward schedule
        if config.parallel.pipeline > 1:
            from flywheel.trainer.megatron.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(self.model, _logprobs_from_logits, document_mask)

    # -------------------------------------------------------------- forward

    def forward_logprobs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        if self.model.config.sequence_parallel:  # the sequence is split over TP ranks: pad T to a multiple
            input_ids, position_ids, targets = pad_to_multiple(
                input_ids, position_ids, targets, self.model.config.tensor_model_parallel_size
            )
        if self.pipeline is not None:
            return self._pipeline_logprobs(input_ids, position_ids, targets, temperature)[:, :t]
        logits = self.model(input_ids, position_ids, document_mask(position_ids))  # [B, T, V / TP]
        return _logprobs_from_logits(logits, targets, temperature)[:, :t]

    def _pipeline_logprobs(self, input_ids, position_ids, targets, temperature: float) -> torch.Tensor:
        from flywheel.trainer.megatron.pipeline import MicroBatch

        batch = MicroBatch(input_ids, position_ids, targets, temperature)
        logprobs = self.pipeline.logprobs(batch)
        if not torch.is_grad_enabled():
            return logprobs
        proxy = logprobs.requires_grad_(True)  # a leaf: the recipe's backward leaves dloss/dlogprobs in .grad
        self._pending.append((batch, proxy))
        return proxy

    # -------------------------------------------------------------- data parallelism

    @property
    def data_shard(self) -> tuple[int, int]:
        """(rank, size) of this rank's share of each step's micro-batches (trainer/objectives.py).

        Data-parallel replicas train different micro-batches and finalize_grads sums them. With
        expert parallelism every rank of an EP group must run the same number of forwards (the
        dispatcher's collectives), so there the replicas keep training the whole step each.
        """
        from megatron.core import parallel_state as ps

        if ps.get_expert_model_parallel_world_size() > 1:
            return 0, 1
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def sum_over_data_shards(self, values: dict) -> dict:
        from megatron.core import parallel_state as ps

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=device())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        return dict(zip(values, t.tolist()))

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> MegatronPolicy:
        self.model.train(mode)
        return self

    # -------------------------------------------------------------- gradients

    def finalize_grads(self) -> None:
        from megatron.core import parallel_state as ps

        if self.pipeline is not None:
            self._pipeline_backward()
        tp_group = ps.get_tensor_model_parallel_group()
        dp_group = ps.get_data_parallel_group()
        expert_dp_group = ps.get_expert_data_parallel_group()
        dp_size = dist.get_world_size(dp_group)
        sharded = self.data_shard[1] > 1  # replicas saw different micro-batches: sum, do not average
        for name, p in self.model.named_parameters():
            if p.grad is None:
                if not (sharded and p.requires_grad):
                    continue
                p.grad = torch.zeros_like(p)  # a rank with no micro-batch this step still joins the sum
            # q/k norms: each TP rank saw only its heads; sequence-parallel norms and router: only its rows
            tp_partial = name.endswith(_TP_PARTIAL_GRADS) or getattr(p, "sequence_parallel", False)
            if ps.get_tensor_model_parallel_world_size() > 1 and tp_partial:
                dist.all_reduce(p.grad, group=tp_group)
            # Mean over data-parallel replicas. An expert sees the tokens of every rank of its EP
            # group (the dispatcher gathers them), so its grad is already summed over those; summing
            # the rest over the expert-DP group and dividing by the full DP size gives the same mean.
            # (Experts are whole on every TP rank, so their replicas are the expert-DP group, not the DP group.)
            group = expert_dp_group if _is_expert(name, p) else dp_group
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
            if dp_size > 1 and not sharded:
                p.grad.div_(dp_size)

    def _pipeline_backward(self) -> None:
        """Run the step's recorded micro-batches through the forward+backward schedule; sync tied embeddings."""
        from megatron.core import parallel_state as ps

        batches = []
        for batch, proxy in self._pending:
            if proxy.grad is not None:  # a forward whose result the loss did not use needs no backward
                batch.grad = proxy.grad
                batches.append(batch)
        self._pending = []
        if batches:
            self.pipeline.backward(batches)
        if self.arch.tie_word_embeddings and ps.is_rank_in_embedding_group():
            # the first stage's embedding and the last stage's output layer are one HF tensor
            weight = self.model.shared_embedding_or_output_weight()
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            dist.all_reduce(weight.grad, group=ps.get_embedding_group())

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global norm: TP-split tensors count on every TP rank, replicated ones once; experts on every EP rank."""
        from megatron.core import parallel_state as ps

        dev = device()
        dense, expert = torch.zeros((), device=dev), torch.zeros((), device=dev)
        tp_rank = ps.get_tensor_model_parallel_rank()
        grads = []
        for p in self.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = p.grad.float().pow(2).sum()
            if getattr(p, "shared", False):
                continue  # PP + tied embeddings: the last stage's copy of the first stage's embedding counts once
            if not getattr(p, "allreduce", True):
                expert += sq
            elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                dense += sq
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(dense, group=ps.get_tensor_model_parallel_group())
        if ps.get_expert_model_parallel_world_size() > 1:
            dist.all_reduce(expert, group=ps.get_expert_model_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:  # each stage holds its own layers
            total = torch.stack([dense, expert])
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
            dense, expert = total[0], total[1]
        norm = math.sqrt(float(dense + expert))
        if norm > max_norm > 0:
            for g in grads:
                g.mul_(max_norm / (norm + 1e-6))
        return norm

    def grads_hf(self) -> dict[str, torch.Tensor]:
        """Gradients under HF names, gathered (collective); for tests and diagnostics."""
        grads = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}
        return full_to_hf(gather_full(self.model, self.arch, grads), self.arch)

    # -------------------------------------------------------------- HF checkpoints

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        state = hf_state_dict(self.model, self.arch)
        if self.arch.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # same tensor as embed_tokens, as HFPolicy returns it
        return state

    def save_hf(self, directory: Path) -> None:
        """Collective: every rank gathers, rank 0 writes the HF folder."""
        from transformers import AutoConfig, AutoModelForCausalLM

        state = hf_state_dict(self.model, self.arch)
        if dist.get_rank() == 0:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.path), dtype=self.dtype)
            model.load_state_dict(state, strict=True)
            model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            if (self.path / "generation_config.json").is_file():
                shutil.copy2(self.path / "generation_config.json", directory / "generation_config.json")
        dist.barrier()
