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

from ..rope import RotaryEmbedding, rotate
from .config import ModelConfig

__all__ = ["AttentionMetadata", "LlamaForCausalLM"]


@dataclass
class AttentionMetadata:
    """Per-step batch layout, in kvquant's calling conventions (all on the cache's device),
    built once by the model runner and shared by every layer.

    ``positions`` [T] int64; ``slot_mapping`` [T] int64 (-1 = padding, not written);
    ``block_tables`` [B, max_blocks] int32; ``seq_lens`` / ``query_lens`` [B] int32, where
    ``seq_lens`` includes this step's chunk. ``plan``: kvquant's attention layout of this
    batch (torch path; None on the Triton path). ``rotary``: the ``(cos, sin)`` of
    ``positions``, filled in by the model before its first layer.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_lens: torch.Tensor
    plan: kvquant.AttentionPlan | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


class RMSNorm(nn.Module):
    """RMS norm computed in float32, as transformers does, then cast back."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (it upcasts to float32 inside), not the six of the written-out form.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_sizes = [q, kv, kv]
        self.q_proj: nn.Module | None = nn.Linear(cfg.hidden_size, q, bias=cfg.qkv_bias, dtype=dtype)
        self.k_proj: nn.Module | None = nn.Linear(cfg.hidden_size, kv, bias=cfg.qkv_bias, dtype=dtype)
        self.v_proj: nn.Module | None = nn.Linear(cfg.hidden_size, kv, bias=cfg.qkv_bias, dtype=dtype)
        # Set instead of q/k/v_proj when the weights are quantized (one fused matrix).
        self.qkv_proj: nn.Module | None = None
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
        t, h, kvh, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = meta.rotary if meta.rotary is not None else rope.lookup(meta.positions, x.dtype)
        if self.qkv_proj is not None and self.q_norm is None:
            # q and k sit side by side in the fused output: rotate them in one pass.
            qkv = self.qkv_proj(x)
            qk = rotate(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), cos, sin)
            q, k = qk[:, :h], qk[:, h:]
            v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
        else:
            if self.qkv_proj is not None:
                q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
            else:
                assert self.q_proj is not None and self.k_proj is not None
                assert self.v_proj is not None
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k, v = q.reshape(t, h, d), k.reshape(t, kvh, d), v.reshape(t, kvh, d)
            if self.q_norm is not None and self.k_norm is not None:
                q = self.q_norm(q)
                k = self.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        kvquant.write(cache, self.layer_idx, k, v, meta.slot_mapping)
        out = kvquant.attention(
            q,
            cache,
            self.layer_idx,
            meta.block_tables,
            meta.seq_lens,
            meta.query_lens,
            self.scale,
            plan=meta.plan,
        )
        y: torch.Tensor = self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
        return y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.intermediate_size = i
        self.gate_proj: nn.Module | None = nn.Linear(h, i, bias=b, dtype=dtype)
        self.up_proj: nn.Module | None = nn.Linear(h, i, bias=b, dtype=dtype)
        # Set instead of gate/up_proj when the weights are quantized (one fused matrix).
        self.gate_up_proj: nn.Module | None = None
        self.down_proj = nn.Linear(i, h, bias=b, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        else:
            assert self.gate_proj is not None and self.up_proj is not None
            gate, up = self.gate_proj(x), self.up_proj(x)
        y: torch.Tensor = self.down_proj(F.silu(gate) * up)
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
        self.lm_head: nn.Module = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
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
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def quantizable_groups(self) -> list[tuple[str, list[str], bool]]:
        """The linears that weight quantization replaces, as ``(fused layer, original linears,
        has bias)`` module paths: per layer q/k/v fused, o, gate/up fused, down. The output
        projection stays in the model's dtype (tied to the embedding when the model ties
        them): quantizing it per channel costs several points of top-1 agreement while saving
        little time (benchmarks/RESULTS.md)."""
        cfg = self.config
        groups: list[tuple[str, list[str], bool]] = []
        for i in range(cfg.num_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            groups += [
                (f"{a}.qkv_proj", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], cfg.qkv_bias),
                (f"{a}.o_proj", [f"{a}.o_proj"], cfg.o_bias),
                (f"{m}.gate_up_proj", [f"{m}.gate_proj", f"{m}.up_proj"], cfg.mlp_bias),
                (f"{m}.down_proj", [f"{m}.down_proj"], cfg.mlp_bias),
            ]
        return groups

    def set_module(self, path: str, module: nn.Module | None) -> None:
        """Replace (or, with None, remove) the submodule at ``path``."""
        parent, _, name = path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, name, module)

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, cache: kvquant.KVCache
    ) -> torch.Tensor:
        x: torch.Tensor = self.model.embed_tokens(input_ids)
        meta.rotary = self.rotary_emb.lookup(meta.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, self.rotary_emb, meta, cache)
        y: torch.Tensor = self.model.norm(x)
        return y

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.lm_head(hidden)
        return y
