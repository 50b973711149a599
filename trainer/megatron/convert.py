"""HF <-> megatron-core weights, both ways, for Qwen3, Qwen3-MoE and Llama; TP/EP/PP-sharded.

Three layers, each a plain function:
  hf_to_full / full_to_hf   HF state dict (transformers' in-memory names) <-> the *full* megatron
                            state dict: megatron's names at TP=EP=PP=1, experts stacked
                            (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj` [E, H, F]).
  shard_full                full megatron dict -> this rank's dict (its TP slice, its experts, its layers).
  gather_full               this rank's model -> full megatron dict (collective over TP, EP and PP).
`load_hf_state_dict(model, hf_sd)` and `hf_state_dict(model)` compose them for a built GPTModel.

The mapping (measured bit-exact, see FIELD-NOTES.md):
  q/k/v_proj        -> linear_qkv, fused per KV group: [q heads of group g; k_g; v_g] for g in groups,
                       so a TP split of dim 0 hands whole groups to each rank
  o_proj            -> linear_proj (TP splits dim 1)
  gate/up_proj      -> linear_fc1 = [gate_r; up_r] per TP rank r (so the split is not contiguous)
  down_proj         -> linear_fc2 (TP splits dim 1)
  post_attention_layernorm -> pre_mlp_layernorm; q_norm/k_norm -> q_layernorm/k_layernorm
  mlp.gate (router) -> mlp.router; experts keep HF's stacked layout, EP splits dim 0
  embed_tokens / lm_head -> word_embeddings / output_layer (TP splits the vocab, dim 0)
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from flywheel.trainer.megatron.model import ModelArch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


# ---------------------------------------------------------------- HF <-> full megatron


def _renamed_layer_tensors(arch: ModelArch, i: int) -> list[tuple[str, str]]:
    """(HF name, megatron name) of layer i's tensors that only change name (both directions use this
    table; the fused ones, qkv and the dense fc1, are split or joined in place)."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    pairs = [
        ("input_layernorm.weight", "input_layernorm.weight"),
        ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
        ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
    ]
    if arch.qk_layernorm:
        pairs += [
            ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
            ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"),
        ]
    if arch.moe_layers[i]:
        pairs += [
            ("mlp.gate.weight", "mlp.router.weight"),
            ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj"),
            ("mlp.experts.down_proj", "mlp.experts.down_proj"),
        ]
    else:
        pairs += [("mlp.down_proj.weight", "mlp.linear_fc2.weight")]
    return [(h + hf_name, m + mg_name) for hf_name, mg_name in pairs]


def hf_to_full(hf: dict[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """HF state dict -> full (unsharded) megatron state dict."""
    hd, groups = arch.head_dim, arch.num_kv_heads
    per_group = arch.num_heads // groups
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(arch.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update({mg_name: hf[hf_name] for hf_name, mg_name in _renamed_layer_tensors(arch, i)})
        for kind in ("weight", "bias") if arch.attention_bias else ("weight",):
            q, k, v = (hf[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv")
            tail = q.shape[1:]  # (H,) for weights, () for biases
            qkv = torch.cat(
                [q.reshape(groups, per_group * hd, *tail), k.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)],
                dim=1,
            )
            out[m + f"self_attention.linear_qkv.{kind}"] = qkv.reshape(-1, *tail)
        if not arch.moe_layers[i]:
            out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
    return out


def full_to_hf(full: dict[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """Full megatron state dict -> HF state dict (lm_head present, tied or not, as HF's own state_dict)."""
    hd, groups = arch.head_dim, arch.num_kv_heads
    per_group = arch.num_heads // groups
    embed = full["embedding.word_embeddings.weight"]
    out = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": full["decoder.final_layernorm.weight"],
        "lm_head.weight": embed if arch.tie_word_embeddings else full["output_layer.weight"],
    }
    for i in range(arch.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update({hf_name: full[mg_name] for hf_name, mg_name in _renamed_layer_tensors(arch, i)})
        for kind in ("weight", "bias") if arch.attention_bias else ("weight",):
            qkv = full[m + f"self_attention.linear_qkv.{kind}"]
            tail = qkv.shape[1:]
            q, k, v = qkv.reshape(groups, (per_group + 2) * hd, *tail).split([per_group * hd, hd, hd], dim=1)
            for name, t in zip("qkv", (q, k, v)):
                out[h + f"self_attn.{name}_proj.{kind}"] = t.reshape(-1, *tail).contiguous()
        if not arch.moe_layers[i]:
            gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
    return out


# ---------------------------------------------------------------- full megatron <-> rank shards


def _tp_dim(name: str) -> int | str | None:
    """How tensor parallelism splits a (full-form) parameter: a dim, 'glu' ([gate_r; up_r]), or None."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")):
        return 0
    if name.endswith(("linear_proj.weight", "mlp.linear_fc2.weight")):
        return 1
    if name.endswith("mlp.linear_fc1.weight"):
        return "glu"
    return None  # norms, router, experts (expert TP is 1)


def _tp_slice(t: torch.Tensor, how, rank: int, size: int) -> torch.Tensor:
    if how is None or size == 1:
        return t
    if how == "glu":
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return t.chunk(size, dim=how)[rank]


def _tp_join(parts: list[torch.Tensor], how) -> torch.Tensor:
    if how is None or len(parts) == 1:
        return parts[0]
    if how == "glu":
        gates, ups = zip(*(p.chunk(2) for p in parts))
        return torch.cat([*gates, *ups])
    return torch.cat(parts, dim=how)


class Layout:
    """Where this rank sits: TP/EP ranks and sizes, its pipeline layers, its expert module kind."""

    def __init__(self, model, arch: ModelArch):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.ep_rank, self.ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.layer_offset = get_transformer_layer_offset(model.config)
        self.num_local_layers = len(model.decoder.layers)
        names = model.state_dict().keys()
        self.sequential_experts = any(".local_experts." in n for n in names)
        self.local_experts = (arch.num_experts or 0) // self.ep_size

    @classmethod
    def offline(cls, arch: ModelArch, tp_rank: int, tp_size: int, ep_rank: int, ep_size: int) -> Layout:
        """A rank's layout without a process group (file conversion; PP=1, stacked experts)."""
        layout = cls.__new__(cls)
        layout.tp_rank, layout.tp_size, layout.ep_rank, layout.ep_size = tp_rank, tp_size, ep_rank, ep_size
        layout.pp_size, layout.layer_offset, layout.num_local_layers = 1, 0, arch.num_layers
        layout.sequential_experts, layout.local_experts = False, (arch.num_experts or 0) // ep_size
        return layout


def shard_full(full: dict[str, torch.Tensor], layout: Layout, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """This rank's megatron state dict, restricted to `names` (the keys its model has; None: all)."""
    out = {}
    for name, t in full.items():
        m = _LAYER.match(name)
        if m:
            local = int(m.group(1)) - layout.layer_offset
            if not 0 <= local < layout.num_local_layers:
                continue
            rest = m.group(2)
            if rest.startswith("mlp.experts."):
                lo = layout.ep_rank * layout.local_experts
                mine = t[lo : lo + layout.local_experts]
                if layout.sequential_experts:  # SequentialMLP: one Linear pair per local expert
                    fc = "linear_fc1" if rest.endswith("gate_up_proj") else "linear_fc2"
                    for j in range(layout.local_experts):
                        out[f"decoder.layers.{local}.mlp.experts.local_experts.{j}.{fc}.weight"] = mine[j]
                    continue
                t = mine
            name = f"decoder.layers.{local}.{rest}"
        if names is not None and name not in names:
            continue
        out[name] = _tp_slice(t, _tp_dim(name), layout.tp_rank, layout.tp_size).contiguous()
    return out


def join_shards(
    shards: dict[tuple[int, int], dict[str, torch.Tensor]], tp_size: int, ep_size: int
) -> dict[str, torch.Tensor]:
    """Offline inverse of shard_full (PP=1, stacked experts): {(tp_rank, ep_rank): dict} -> full dict."""
    full = {}
    for name in shards[(0, 0)]:
        if ".mlp.experts." in name:  # experts: split over EP (replicated over TP)
            full[name] = torch.cat([shards[(0, e)][name] for e in range(ep_size)])
        else:  # everything else: split over TP (replicated over EP)
            full[name] = _tp_join([shards[(t, 0)][name] for t in range(tp_size)], _tp_dim(name))
    return full


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def gather_full(model, arch: ModelArch, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Collective: every rank of the model-parallel group calls it and gets the full dict (on CPU).

    `tensors` defaults to the model's state dict; pass e.g. {name: param.grad} to gather gradients.
    """
    from megatron.core import parallel_state as ps

    layout = Layout(model, arch)
    mine: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}
    for name, t in (model.state_dict() if tensors is None else tensors).items():
        if name.endswith("_extra_state") or t is None:
            continue
        t = t.detach()
        m = _LAYER.match(name)
        if m:
            layer, rest = int(m.group(1)) + layout.layer_offset, m.group(2)
            seq = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", rest)
            if seq:  # restack SequentialMLP weights into the full [E, ...] form
                key = f"decoder.layers.{layer}.mlp.experts." + (
                    "gate_up_proj" if seq.group(2) == "linear_fc1" else "down_proj"
                )
                experts.setdefault(key, []).append(t)
                continue
            name = f"decoder.layers.{layer}.{rest}"
        if ".mlp.experts." in name:
            experts[name] = [t]
            continue
        how = _tp_dim(name)
        mine[name] = (
            _tp_join(_all_gather(t, ps.get_tensor_model_parallel_group()), how)
            if how is not None and layout.tp_size > 1
            else t
        )
    for name, local in experts.items():
        stacked = torch.stack(local) if len(local) > 1 or local[0].dim() == 2 else local[0]
        if layout.ep_size > 1:
            stacked = torch.cat(_all_gather(stacked, ps.get_expert_model_parallel_group()))
        mine[name] = stacked
    mine = {k: v.cpu() for k, v in mine.items()}
    if layout.pp_size > 1:  # every stage contributes its layers
        stages: list[dict] = [None] * layout.pp_size  # type: ignore[list-item]
        dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
        mine = {k: v for stage in stages for k, v in stage.items()}
    return mine


# ---------------------------------------------------------------- on a built model


def load_hf_state_dict(model, hf: dict[str, torch.Tensor], arch: ModelArch) -> None:
    """Copy HF weights into this rank's GPTModel shard (strict: every parameter must be covered)."""
    layout = Layout(model, arch)
    own = model.state_dict()
    names = {n for n, t in own.items() if not n.endswith("_extra_state")}
    full = hf_to_full(hf, arch)
    if arch.tie_word_embeddings and "output_layer.weight" in names:
        # PP > 1: the last stage holds its own copy of the tied embedding as its output layer
        full["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    shard = shard_full(full, layout, names)
    missing = sorted(names - set(shard))
    if missing:
        raise KeyError(f"HF weights do not cover megatron parameters {missing[:5]}")
    with torch.no_grad():
        for name, t in shard.items():
            if own[name].shape != t.shape:
                raise ValueError(f"{name}: HF gives {tuple(t.shape)}, megatron expects {tuple(own[name].shape)}")
            own[name].copy_(t)


def hf_state_dict(model, arch: ModelArch) -> dict[str, torch.Tensor]:
    """HF-named full state dict of a (possibly sharded) GPTModel; collective over model-parallel ranks."""
    return full_to_hf(gather_full(model, arch), arch)
