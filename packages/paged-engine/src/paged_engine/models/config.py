"""The decoder shape the engine needs, read from a transformers-style ``config.json`` dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    """Shape and options of a Llama-family decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_params: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Read a ``config.json`` dict (old ``rope_theta``/``rope_scaling`` or new ``rope_parameters``)."""
        model_type = str(cfg.get("model_type", "llama"))
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not "
                f"supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        rope: dict[str, Any] = {}
        rp = cfg.get("rope_parameters")
        if isinstance(rp, Mapping):
            rope.update(rp)
        if cfg.get("rope_scaling"):
            rope.update(cfg["rope_scaling"])
        if "rope_theta" not in rope:
            rope["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
        # Qwen2 always has q/k/v biases (and none on o_proj); the others follow attention_bias.
        qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
        sliding: int | None = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        eos_ids = (
            [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        )
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_params=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=qkv_bias and model_type != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )

    @property
    def max_len(self) -> int:
        """Longest context computed exactly: sliding-window attention is not implemented, so a
        windowed model is limited to its window (within it, full attention is identical)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * d
        emb = self.vocab_size * h
        return self.num_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) + h
