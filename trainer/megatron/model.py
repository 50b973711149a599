"""Build a megatron-core GPTModel from an HF config.json (Qwen3 dense, Qwen3-MoE, Llama/SmolLM2).

`ModelArch` is the handful of numbers both backends agree on, read from the HF config;
`transformer_config` turns it into megatron's TransformerConfig and `layer_specs` into the local
layer spec with our fast pieces plugged in:
  attention="sdpa"     SDPACoreAttention (torch SDPA / flash) instead of the s x s local attention
  experts="grouped"    GroupedExperts + SyncFreeMoELayer instead of SequentialMLP
The "local"/"sequential" choices keep megatron's modules as shipped (the benchmark's baseline).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

SUPPORTED = {"qwen3", "qwen3_moe", "llama"}


@dataclass(frozen=True)
class ModelArch:
    """What megatron needs to know about an HF decoder-only model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_layernorm: bool
    attention_bias: bool
    initializer_range: float = 0.02
    num_experts: int | None = None
    moe_topk: int = 0
    moe_ffn_hidden_size: int | None = None
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = field(default=())  # per layer: MoE (True) or dense MLP

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)


def _rope_theta(hf) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ValueError(f"rope_type {rope_type!r} is not supported by the megatron backend (only default RoPE)")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise ValueError("HF config has no rope_theta")
    return float(theta)


def arch_from_hf(hf_config) -> ModelArch:
    """Read a transformers PretrainedConfig (or a path to a folder / config.json)."""
    if isinstance(hf_config, (str, Path)):
        from transformers import AutoConfig

        path = Path(hf_config)
        hf_config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
    mtype = hf_config.model_type
    if mtype not in SUPPORTED:
        raise ValueError(
            f"model_type {mtype!r} is not supported by the megatron backend (supported: {', '.join(sorted(SUPPORTED))})"
        )
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    common = dict(
        model_type=mtype,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_theta(hf_config),
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qk_layernorm=mtype in ("qwen3", "qwen3_moe"),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        initializer_range=getattr(hf_config, "initializer_range", 0.02),
    )
    if mtype == "llama" and getattr(hf_config, "mlp_bias", False):
        raise ValueError("Llama with mlp_bias=True is not supported by the megatron backend")
    if mtype != "qwen3_moe":
        return ModelArch(**common, moe_layers=(False,) * common["num_layers"])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(hf_config, "mlp_only_layers", []) or [])
    moe_layers = tuple(i not in dense_only and (i + 1) % step == 0 for i in range(common["num_layers"]))
    return ModelArch(
        **common,
        num_experts=hf_config.num_experts,
        moe_topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        norm_topk_prob=bool(hf_config.norm_topk_prob),
        moe_layers=moe_layers,
    )


def transformer_config(
    arch: ModelArch, parallel, dtype: torch.dtype = torch.float32, fused: bool = False, recompute: bool = False
):
    """megatron TransformerConfig equal to the HF model (no dropout, no fusions that need TE/apex).

    fused=True (GPU only) turns on megatron's torch.compile'd fusions that need neither TE nor apex:
    bias-dropout-add, SwiGLU and the native fused vocab-parallel cross-entropy.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.attention_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,  # what pipeline stages send each other; megatron requires it for PP > 1
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        # Fusions that need apex/TE (or CUDA JIT) are off; SDPA does the attention fusion.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
    )
    if recompute:  # gradient checkpointing: recompute every layer in backward
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if fused and not on_cpu:
        kwargs.update(
            bias_dropout_fusion=True,
            bias_activation_fusion=True,
            cross_entropy_loss_fusion=True,
            cross_entropy_fusion_impl="native",
        )
    if arch.is_moe:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # HF norm_topk_prob=True: softmax over the top-k logits == megatron's default;
            # False: softmax over all experts, then top-k == megatron's pre-softmax routing.
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            moe_layer_freq=[1 if m else 0 for m in arch.moe_layers],
        )
        if parallel.tensor_parallel > 1:  # megatron trains MoE under TP only with sequence parallelism
            # (TE-free norms for it: trainer/megatron/sequence_parallel.py); experts stay whole per TP rank
            kwargs.update(sequence_parallel=True, expert_tensor_parallel_size=1)
    return TransformerConfig(**kwargs)


def layer_specs(
    config, attention: Literal["sdpa", "local"] = "sdpa", experts: Literal["grouped", "sequential"] = "grouped"
):
    """Local (no-TE) layer specs of every layer of this pipeline stage, with our modules plugged in."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from flywheel.trainer.megatron.attention import SDPACoreAttention
    from flywheel.trainer.megatron.experts import GroupedExperts, SyncFreeMoELayer

    block = copy.deepcopy(get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm"))
    for spec in block.layer_specs:
        if attention == "sdpa":
            spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        mlp = spec.submodules.mlp
        if experts == "grouped" and config.num_moe_experts and isinstance(mlp.submodules, MoESubmodules):
            spec.submodules.mlp = ModuleSpec(
                module=SyncFreeMoELayer,
                metainfo=mlp.metainfo,
                submodules=MoESubmodules(
                    experts=ModuleSpec(module=GroupedExperts), shared_experts=mlp.submodules.shared_experts
                ),
            )
    if config.sequence_parallel:
        from flywheel.trainer.megatron.sequence_parallel import use_sequence_parallel_norms

        use_sequence_parallel_norms(block)
    return block


def build_gpt(
    arch: ModelArch,
    parallel,
    dtype: torch.dtype = torch.float32,
    attention: Literal["sdpa", "local"] = "sdpa",
    experts: Literal["grouped", "sequential"] = "grouped",
    fused: bool = False,
    recompute: bool = False,
    compile_layers: bool = False,
):
    """This rank's GPTModel (its TP/EP shard, its pipeline stage), on the current device.

    compile_layers=True compiles every transformer layer with torch.compile (regional compilation,
    as torchtitan does): what TransformerEngine fuses on GPU (RMSNorm, RoPE, SwiGLU, residual adds,
    the MoE router's softmax/top-k and permutation) becomes a few Triton kernels without TE. All
    layers share one compiled graph (parameters are graph inputs), so it compiles once per layer kind.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    if arch.vocab_size % parallel.tensor_parallel:
        raise ValueError(f"vocab size {arch.vocab_size} is not divisible by tensor_parallel={parallel.tensor_parallel}")
    config = transformer_config(arch, parallel, dtype, fused, recompute)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_specs(config, attention, experts),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        parallel_output=True,
    )
    if torch.cuda.is_available():
        model = model.cuda()
    if compile_layers:
        compile_transformer_layers(model)
    return model


def _default_tp_group(tp_group, is_expert=False, check_initialized=True):
    """megatron.core.utils.get_tensor_model_parallel_group_if_none without its per-call warning."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        return None
    if tp_group is not None or not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def _cross_entropy(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] from logits [s, b, V] and labels [b, s] (megatron's layout and contract)."""
    s, b, v = logits.shape
    loss = F.cross_entropy(logits.float().view(-1, v), labels.transpose(0, 1).reshape(-1), reduction="none")
    return loss.view(s, b).transpose(0, 1).contiguous()


def compile_transformer_layers(model) -> None:
    """torch.compile each decoder layer and the final norm in place (the module keeps its state dict)."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError("compile_transformer_layers needs a GPTModel with a decoder")
    # megatron 0.16's RowParallelLinear warns on every forward that tp_group is None (a
    # deprecation). A warning is a graph break dynamo cannot resume from inside megatron's
    # offloading context, which would drop the rest of each layer back to eager: resolve the
    # default group the same way, without the warning.
    import megatron.core.tensor_parallel.layers as tp_layers

    tp_layers.get_tensor_model_parallel_group_if_none = _default_tp_group
    if model.config.tensor_model_parallel_size == 1 and hasattr(model, "compute_language_model_loss"):
        # The vocabulary is not sharded: the loss is a plain cross-entropy, which inductor fuses
        # (one pass over the logits, fp32 math, no fp32 copy of them kept for backward).
        model.compute_language_model_loss = torch.compile(_cross_entropy)
    # dynamic=None: the first shape compiles static; a new shape (the trainer's token-budget
    # micro-batches vary in length) recompiles once with dynamic shapes instead of once per length
    from flywheel.trainer.megatron.experts import SyncFreeDispatcher

    for layer in decoder.layers:
        dispatcher = getattr(layer.mlp, "token_dispatcher", None)
        if dispatcher is None or isinstance(dispatcher, SyncFreeDispatcher):
            layer.compile()
            continue
        # Experts spread over ranks: megatron's all-gather dispatcher (masked_select on a routing
        # map dynamo cannot keep boolean) stays eager; everything around it is compiled.
        for part in (layer.input_layernorm, layer.self_attention, layer.pre_mlp_layernorm, layer.mlp.experts):
            part.compile()
    if getattr(decoder, "final_layernorm", None) is not None:
        decoder.final_layernorm.compile()
