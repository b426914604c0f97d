"""Every ``EngineConfig`` field as a command-line flag, derived from the dataclass itself.

``add_engine_args`` adds ``--<field-name>`` for each field of ``EngineConfig`` (except ``model``,
which is positional), so a field the engine gains later becomes a flag with no change here.
Flags left out keep the engine's defaults; ``none`` sets an optional field to None; booleans get
``--x / --no-x``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from paged_engine import EngineConfig
from paged_engine.config import (
    DTYPES,
    EVICTION_POLICIES,
    KV_INT4_LAYOUTS,
    QUANT_POLICIES,
    WEIGHT_QUANT_CHOICES,
)

__all__ = ["ENGINE_FLAG_CHOICES", "ENGINE_FLAG_HELP", "add_engine_args", "engine_config_from_args"]

# Help for the fields known today; a new field gets a generic line.
ENGINE_FLAG_HELP: Mapping[str, str] = {
    "device": "auto (the default: CUDA when available, else CPU), cpu or cuda[:N]",
    "dtype": "weights and activations: auto (the default: bfloat16 on CUDA and on CPUs with "
    "native bfloat16, else float32), float32, float16 or bfloat16",
    "weight_quant": "weight-only quantized linear layers on CPU: auto (the default: int4 for a "
    "4-bit GGUF, int8 otherwise; none on CUDA), int8 (per channel), int4 (groups of 32) or "
    "none (weights as loaded)",
    "block_size": "tokens per KV block (a power of two)",
    "quant_policy": "KV cache quantization: 0 (none), 8 (int8) or 4 (int4)",
    "kv_int4_layout": "int4 key layout under --quant-policy 4: block-channel (the default: keys "
    "per block and channel, the open block exact; keeps quality) or token (per token, "
    "LMDeploy's layout; more capacity)",
    "enable_prefix_caching": "reuse the KV blocks of already computed prompt prefixes",
    "cache_size_limit": "fraction of free memory given to KV blocks, in (0, 1] (default: 0.8 of "
    "free GPU memory; on CPU 0.5 of available RAM, at most 4 GiB)",
    "num_blocks": "number of KV blocks (overrides --cache-size-limit)",
    "max_batch_size": "most sequences per step (default: 256 on GPU, 64 on CPU)",
    "max_num_batched_tokens": "token budget per step; long prompts are prefilled in chunks "
    "(default: 8192 on GPU, 512 on CPU)",
    "max_model_len": "longest sequence, prompt plus output (default: the model's, at most 8192)",
    "eviction_policy": "which cached blocks go first when memory is needed: lru, lfu or hybrid",
    "cache_ttl": "seconds an unused cached block may live; 'none' (the default): no limit",
    "prefix_match_threshold": "fraction of a prompt that must be cached for a request to count "
    "as a cache hit when scheduling",
    "kv_disk_dir": "directory of the disk tier of the prefix cache: evicted blocks are written "
    "there and survive restarts; 'none' (the default): no disk tier",
    "kv_disk_size_limit": "bytes the disk tier may hold; the least recently used blocks go "
    "first; 'none' (the default): no limit",
    "seed": "seed of the engine's random stream (requests with their own seed are independent)",
    "revision": "branch, tag or commit of a Hugging Face Hub MODEL [default: main]",
}

# Flags whose values form a closed set: argparse checks them and --help lists them.
ENGINE_FLAG_CHOICES: Mapping[str, tuple[Any, ...]] = {
    "quant_policy": QUANT_POLICIES,
    "eviction_policy": EVICTION_POLICIES,
    "dtype": ("auto", *DTYPES),
    "weight_quant": WEIGHT_QUANT_CHOICES,
    "kv_int4_layout": KV_INT4_LAYOUTS,
}

_SKIP = frozenset({"model"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(tp: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(parse function, or None for booleans; whether None is allowed) for a field's type."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    members = [a for a in args if a is not type(None)] if optional else [tp]
    if members == [bool]:
        return None, optional
    if int in members and float not in members and str not in members:
        return int, optional
    if float in members and str not in members:
        return float, optional
    return str, optional


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every ``EngineConfig`` field but ``model``; unset flags parse to absent."""
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine (EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _SKIP or not f.init:
            continue
        parse, optional = _converter(hints.get(f.name, str))
        choices = ENGINE_FLAG_CHOICES.get(f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        text = ENGINE_FLAG_HELP.get(f.name, f"EngineConfig.{f.name}")
        if "default" not in text:
            text = f"{text} [default: {'none' if default is None else default}]"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if parse is None:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _optional(parse) if optional else parse
        if choices is not None:
            kw["choices"] = (*choices, None) if optional else choices
            kw["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
        group.add_argument(_flag(f.name), **kw)


def engine_config_from_args(args: argparse.Namespace, model: str | None) -> EngineConfig:
    """An ``EngineConfig`` from the flags that were given (others keep their defaults).

    Raises ``ValueError`` (from ``EngineConfig`` validation) for bad values.
    """
    names = {f.name for f in dataclasses.fields(EngineConfig)} - _SKIP
    kwargs = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if model is not None:
        kwargs["model"] = model
    return EngineConfig(**kwargs)
