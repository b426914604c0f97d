"""EngineConfig / SamplingParams defaults and validation, and model-config parsing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from paged_engine import EngineConfig, SamplingParams
from paged_engine.config import cpu_has_native_bf16
from paged_engine.models.config import ModelConfig
from paged_engine.rope import rope_frequencies


def test_engine_config_defaults() -> None:
    c = EngineConfig(device="cpu")
    assert c.model == "default"
    assert c.block_size == 16
    assert c.quant_policy == 0
    # bfloat16 exactly where the CPU computes it natively.
    assert c.torch_dtype() == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert c.weight_quant == "auto"
    assert c.resolved_weight_quant(native_4bit=True) == "int4"
    assert c.resolved_weight_quant(native_4bit=False) == "int8"
    assert c.replace(weight_quant=None).resolved_weight_quant(True) is None
    assert c.resolved_max_batch_size() == 64
    assert c.resolved_max_num_batched_tokens() == 512
    assert c.resolved_max_model_len(32768) == 8192
    assert c.resolved_max_model_len(2048) == 2048
    assert 0 < c.kv_budget_bytes(torch.device("cpu")) <= 4 << 30


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("quant_policy", 2, "quant_policy"),
        ("weight_quant", "int3", "weight_quant"),
        ("weight_quant", "none", "weight_quant"),
        ("quant_policy", True, "quant_policy"),
        ("block_size", 0, "block_size"),
        ("block_size", 12, "power of two"),
        ("cache_size_limit", 1.5, "cache_size_limit"),
        ("cache_size_limit", 0.0, "cache_size_limit"),
        ("num_blocks", 0, "num_blocks"),
        ("max_batch_size", 0, "max_batch_size"),
        ("max_num_batched_tokens", -1, "max_num_batched_tokens"),
        ("max_model_len", 1, "max_model_len"),
        ("dtype", "int8", "dtype"),
        ("device", "tpu", "device"),
        ("model", "", "model"),
    ],
)
def test_engine_config_rejects(field: str, value: Any, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        EngineConfig(**{field: value})


def test_max_model_len_above_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceeds the model's context"):
        EngineConfig(max_model_len=4096).resolved_max_model_len(2048)


def test_sampling_params() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.seed, p.ignore_eos) == (16, 1.0, None, False)
    assert SamplingParams(temperature=0).greedy
    for kwargs in (
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"seed": 1.5},
        {"max_tokens": 2.0},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_model_config_old_style_rope_scaling() -> None:
    raw = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "eos_token_id": [1, 2],
    }
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_params["rope_type"] == "linear"
    assert cfg.rope_params["rope_theta"] == 500000.0
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4
    assert cfg.eos_token_ids == [1, 2]
    inv, scale = rope_frequencies(4, cfg.rope_params, 16)
    assert scale == 1.0 and inv.shape == (2,)


def test_model_config_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="not supported"):
        ModelConfig.from_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling type"):
        rope_frequencies(4, {"rope_type": "longrope"}, 16)


def test_qwen_sliding_window_only_when_enabled() -> None:
    base = {
        "model_type": "qwen2",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "sliding_window": 64,
        "max_position_embeddings": 1024,
    }
    assert ModelConfig.from_dict(base).max_len == 1024
    assert ModelConfig.from_dict({**base, "use_sliding_window": True}).max_len == 64
    assert ModelConfig.from_dict(base).qkv_bias


def test_lmdeploy_engine_names_are_aliases() -> None:
    cfg = EngineConfig(cache_max_entry_count=0.3, session_len=128, max_prefill_token_num=64)
    assert (cfg.cache_size_limit, cfg.max_model_len, cfg.max_num_batched_tokens) == (0.3, 128, 64)
    assert EngineConfig(session_len=128, max_model_len=128).max_model_len == 128
    for alias, name in (
        ("session_len", "max_model_len"),
        ("cache_max_entry_count", "cache_size_limit"),
    ):
        with pytest.raises(ValueError, match=f"{alias}=.* and {name}="):
            EngineConfig(
                **{alias: 0.5 if "cache" in alias else 64, name: 0.25 if "cache" in alias else 32}
            )
    # In replace() an alias overrides the field's old value, as the field's own name would.
    assert cfg.replace(session_len=256).max_model_len == 256
    with pytest.raises(ValueError, match="session_len"):
        cfg.replace(session_len=256, max_model_len=64)
    with pytest.raises(ValueError, match="cache_size_limit"):
        EngineConfig(cache_max_entry_count=2.0)  # the alias's value is validated as the field's
    assert EngineConfig(tp=1) == EngineConfig()
    with pytest.raises(ValueError, match="one device"):
        EngineConfig(tp=2)
