"""Core attention through torch's scaled_dot_product_attention, for megatron's local layer spec.

megatron-core's local `DotProductAttention` materialises the full [b*h, s, s] score matrix with
baddbmm + softmax (TransformerEngine's fused kernels are what it normally relies on). This drop-in
replacement hands q/k/v to `F.scaled_dot_product_attention`, which picks FlashAttention-2 /
memory-efficient kernels on a GPU and a fused kernel on the CPU, and handles grouped-query attention
without materialising repeated K/V heads.

Shapes follow megatron: query [sq, b, heads, hd], key/value [sk, b, groups, hd] (this rank's share
under tensor parallelism); the output is [sq, b, heads * hd].
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Causal (or explicitly masked) attention via torch SDPA; no parameters."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        sq, b, heads, hd = query.shape
        # [s, b, h, d] -> [b, h, s, d]: a view; SDPA accepts the strides (last dim contiguous).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron masks are True where attention is *forbidden*; SDPA's boolean masks are True where allowed.
        sdpa_mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=sdpa_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hd)
