"""Shared helpers: tiny random transformers models saved to disk, and HF greedy references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# The models here are tiny: one thread is fastest, and with a second thread OpenMP's spin-waits
# make a step up to 100x slower when the other core is busy.
torch.set_num_threads(1)

TINY_BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "eos_token_id": None,
    "bos_token_id": None,
    "pad_token_id": None,
    "tie_word_embeddings": False,
}

# name -> (transformers config class name, overrides)
# Keep in sync with the names test_hf_parity.py parametrizes over.
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied-llama3": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2-yarn": (
        "Qwen2Config",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "qwen3-linear": (
        "Qwen3Config",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
}


def make_tiny_model(root: Path, name: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Save a tiny random model of kind ``name`` under ``root``; return its dir and the HF model."""
    import transformers

    cls_name, overrides = TINY_MODELS[name]
    cfg = getattr(transformers, cls_name)(**{**TINY_BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    out = root / name
    model.save_pretrained(out)
    return out, model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    """Factory: tiny model name -> (directory, HF model); built once per session."""
    cache: dict[str, tuple[Path, Any]] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def get(name: str) -> tuple[Path, Any]:
        if name not in cache:
            cache[name] = make_tiny_model(root, name)
        return cache[name]

    return get
