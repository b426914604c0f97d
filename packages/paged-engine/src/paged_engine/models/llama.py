"""One decoder for the Llama family: Llama, Mistral (no sliding window), Qwen2 (qkv bias) and
Qwen3 (q/k norm), with tied or untied embeddings.

The forward pass takes a flattened batch: the tokens of every scheduled sequence (prefill
chunks and decode tokens alike) concatenated into ``[T]``. K/V are written to the paged cache
with ``kvquant.write`` and attention reads them back with ``kvquant.attention``, so quantized
caches are exercised on every token. Parameter names match transformers' state dicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kvquant

from ..rope import RotaryEmbedding
from .config import ModelConfig

__all__ = ["AttentionMetadata", "LlamaForCausalLM"]


@dataclass
class AttentionMetadata:
    """Per-step batch layout, in kvquant's calling conventions (all on the cache's device).

    ``positions`` [T] int64; ``slot_mapping`` [T] int64 (-1 = padding, not written);
    ``block_tables`` [B, max_blocks] int32; ``seq_lens`` / ``query_lens`` [B] int32, where
    ``seq_lens`` includes this step's chunk.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_lens: torch.Tensor


class RMSNorm(nn.Module):
    """RMS norm computed in float32, as transformers does, then cast back."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q, bias=cfg.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(cfg.hidden_size, kv, bias=cfg.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(cfg.hidden_size, kv, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        meta: AttentionMetadata,
        cache: kvquant.KVCache,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = rope(meta.positions, q, k)
        kvquant.write(cache, self.layer_idx, k, v, meta.slot_mapping)
        out = kvquant.attention(
            q, cache, self.layer_idx, meta.block_tables, meta.seq_lens, meta.query_lens, self.scale
        )
        y: torch.Tensor = self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
        return y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b, dtype=dtype)
        self.up_proj = nn.Linear(h, i, bias=b, dtype=dtype)
        self.down_proj = nn.Linear(i, h, bias=b, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, dtype)
        self.mlp = MLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        meta: AttentionMetadata,
        cache: kvquant.KVCache,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, cache)
        y: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return y


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head. ``forward`` returns hidden states; ``logits`` projects chosen rows.

    ``max_positions`` bounds the rotary tables (the engine's ``max_model_len``).
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.max_positions = max_positions
        self.model = LlamaModel(cfg, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, cfg.rope_params, cfg.max_position_embeddings, max_positions
        )

    def reset_rotary(self, device: torch.device) -> None:
        """Recompute the rotary tables on ``device`` (after building on the meta device)."""
        cfg = self.config
        with torch.device(device):
            self.rotary_emb = RotaryEmbedding(
                cfg.head_dim, cfg.rope_params, cfg.max_position_embeddings, self.max_positions
            )

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, cache: kvquant.KVCache
    ) -> torch.Tensor:
        x: torch.Tensor = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, self.rotary_emb, meta, cache)
        y: torch.Tensor = self.model.norm(x)
        return y

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.lm_head(hidden)
        return y
