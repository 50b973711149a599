"""MoE experts through one grouped GEMM, and a token permutation without host syncs.

megatron-core 0.16.1 without TransformerEngine offers `SequentialMLP` (a Python loop over experts
that first copies `tokens_per_expert` to the host) or `GroupedMLP` (needs the external
`grouped_gemm` package). Here:

- `GroupedExperts` keeps all local experts' weights stacked, in the HF layout
  (`gate_up_proj` [E, 2F, H], `down_proj` [E, H, F]) so conversion is a slice, and runs each
  projection as one `grouped_mm` over the tokens sorted by expert. The group boundaries are a
  cumulative sum computed on the device, so the kernel launch needs no host round trip.
- `SyncFreeDispatcher` replaces megatron's all-gather dispatcher when the MoE layer has no expert
  or tensor parallelism. Megatron's permutation uses `masked_select` and `tokens_per_expert.cpu()`,
  both of which wait for the GPU; with no token dropping every token has exactly top-k experts, so
  the permuted length is known (tokens * k) and a stable argsort gives the same order (expert-major,
  tokens ascending) with static shapes.
- `SyncFreeMoELayer` is megatron's MoELayer with that dispatcher swapped in (router, shared experts
  and everything else unchanged); with EP or TP > 1 it keeps megatron's dispatcher, whose
  communication it needs, and `GroupedExperts` still does the expert math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


class GroupedExperts(MegatronModule):
    """All local experts of one layer as two stacked weights and two grouped GEMMs."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None):
        super().__init__(config=config)
        if pg_collection is not None and pg_collection.expt_tp.size() > 1:
            raise ValueError("GroupedExperts does not shard experts over tensor parallelism (expert TP must be 1)")
        if config.add_bias_linear:
            raise ValueError("GroupedExperts has no expert biases (Qwen3-MoE has none)")
        self.num_local_experts = num_local_experts
        self.gated = config.gated_linear_unit
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        fc1_out = 2 * ffn if self.gated else ffn
        self.gate_up_proj = torch.nn.Parameter(
            torch.empty(num_local_experts, fc1_out, hidden, device=device, dtype=config.params_dtype)
        )
        self.down_proj = torch.nn.Parameter(
            torch.empty(num_local_experts, hidden, ffn, device=device, dtype=config.params_dtype)
        )
        if config.perform_initialization:
            with torch.no_grad():
                for e in range(num_local_experts):
                    config.init_method(self.gate_up_proj[e])
                    config.output_layer_init_method(self.down_proj[e])
        # megatron's grad-reduction code reads these flags: expert weights are not all-reduced over EP.
        for p in (self.gate_up_proj, self.down_proj):
            p.allreduce = not (config.expert_model_parallel_size > 1)

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        """tokens [n, H] sorted by expert; tokens_per_expert [E] (any device); probs [n]."""
        offsets = torch.cumsum(tokens_per_expert.to(tokens.device, non_blocking=True), 0, dtype=torch.int32)
        # grouped_mm computes x @ w per group; our weights are [out, in] like nn.Linear, hence .mT.
        h = _grouped_mm(tokens, self.gate_up_proj.mT, offs=offsets)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.config.activation_func(gate) * up
        else:
            h = self.config.activation_func(h)
        # Same place and precision as megatron's MLP applies the routing weight (before fc2).
        h = (h * probs.unsqueeze(-1)).to(tokens.dtype)
        return _grouped_mm(h, self.down_proj.mT, offs=offsets), None


class _PermuteRows(torch.autograd.Function):
    """rows = x[perm], with the gradient gathered back through the inverse permutation."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm] for a permutation `perm` whose inverse is `inverse` (inverse[perm] == arange)."""
    return _PermuteRows.apply(x, perm, inverse)


class SyncFreeDispatcher(MoETokenDispatcher):
    """Single-rank token permutation with static shapes: no masked_select, no .cpu(), no .item()."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        if config.moe_expert_capacity_factor is not None:
            raise ValueError("SyncFreeDispatcher needs dropless routing (moe_expert_capacity_factor=None)")
        self.topk = config.moe_router_topk

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        self.routing_map = routing_map
        return hidden_states.view(-1, self.hidden_shape[-1]), probs

    def token_dispatch(self, hidden_states, probs):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states, probs):
        num_tokens, num_experts = self.routing_map.shape
        # Flattened [E, T] mask: a stable descending sort puts the T*k selected (expert, token)
        # pairs first, expert-major with tokens ascending, which is megatron's masked_select order.
        flat = self.routing_map.T.reshape(-1).to(torch.int8)
        order = torch.argsort(flat, descending=True, stable=True)[: num_tokens * self.topk]
        token_ids = order % num_tokens
        # Slot i of the token-major layout (token i // k, its (i % k)-th expert) sits at
        # expert-major position by_token[i]. Both layouts are permutations of one another, so
        # moving rows between them is a gather whose backward is the inverse gather: no
        # index_add with atomics (which cost a fifth of a large MoE step on the H200).
        self.by_token = torch.argsort(token_ids, stable=True)
        self.to_expert = torch.empty_like(self.by_token)
        self.to_expert[self.by_token] = torch.arange(self.by_token.numel(), device=order.device)
        tokens_per_expert = self.routing_map.sum(dim=0)
        permuted_probs = probs.T.reshape(-1).index_select(0, order)
        self.routing_map = None
        token_major = hidden_states.repeat_interleave(self.topk, dim=0)  # backward: a sum over k
        return permute_rows(token_major, self.to_expert, self.by_token), tokens_per_expert, permuted_probs

    def combine_preprocess(self, expert_output):
        # Regroup the k outputs of each token next to each other and sum them: deterministic (no
        # atomics) and accumulated in fp32 by torch's reduction, as HF's grouped_mm path does.
        hidden = expert_output.shape[-1]
        token_major = permute_rows(expert_output, self.by_token, self.to_expert)
        return token_major.view(-1, self.topk, hidden).sum(dim=1)

    def token_combine(self, hidden_states):
        return hidden_states

    def combine_postprocess(self, hidden_states):
        return hidden_states.view(self.hidden_shape)


class SyncFreeMoELayer(MoELayer):
    """megatron's MoELayer; the sync-free dispatcher when experts are not spread over ranks."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if self.token_dispatcher.tp_size * self.token_dispatcher.ep_size == 1:
            self.token_dispatcher = SyncFreeDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
            )
