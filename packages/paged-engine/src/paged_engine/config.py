"""Engine configuration: one validated dataclass and the rules that resolve its automatic values."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import InitVar, dataclass
from typing import Any, Literal

import torch

__all__ = [
    "DTYPES",
    "EVICTION_POLICIES",
    "LMDEPLOY_ENGINE_NAMES",
    "QUANT_POLICIES",
    "WEIGHT_QUANT_CHOICES",
    "EngineConfig",
    "available_host_memory",
    "cpu_has_native_bf16",
    "cpu_weight_quant_kernels",
    "free_device_memory",
    "resolve_aliases",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Defaults from the design: a CPU step stays small so no stream stalls for seconds on two cores.
CPU_MAX_BATCH_SIZE = 64
CPU_MAX_NUM_BATCHED_TOKENS = 512
GPU_MAX_BATCH_SIZE = 256
GPU_MAX_NUM_BATCHED_TOKENS = 8192
MAX_MODEL_LEN_CAP = 8192
GPU_CACHE_FRACTION = 0.8
CPU_CACHE_FRACTION = 0.5
# Several engines, a test process and a reference model must share one machine's RAM.
CPU_CACHE_CAP_BYTES = 4 << 30
EVICTION_POLICIES = ("lru", "lfu", "hybrid")
WEIGHT_QUANT_CHOICES = ("auto", "int8", "int4")
QUANT_POLICIES = (0, 8, 4)  # bits of the stored K/V: 0 = unquantized
# LMDeploy's engine-config names (TurbomindEngineConfig / PytorchEngineConfig) -> ours.
LMDEPLOY_ENGINE_NAMES: Mapping[str, str] = {
    "cache_max_entry_count": "cache_size_limit",
    "session_len": "max_model_len",
    "max_prefill_token_num": "max_num_batched_tokens",
}


def resolve_aliases(
    values: Mapping[str, Any], aliases: Mapping[str, str], owner: str
) -> dict[str, Any]:
    """``values`` with every alias (a key of ``aliases``) renamed to the name it stands for.
    Raises ValueError when an alias and its name are both given with different values."""
    out = dict(values)
    for alias, name in aliases.items():
        if alias in out:
            value = out.pop(alias)
            if name in out and out[name] != value:
                raise ValueError(
                    f"{owner}: {alias}={value!r} and {name}={out[name]!r} are the same setting "
                    f"under two names; give one of them"
                )
            out[name] = value
    return out
KV_INT4_LAYOUTS = ("block-channel", "token")


@dataclass
class EngineConfig:
    """Everything that shapes an engine; validated on construction.

    ``None`` / ``"auto"`` fields are resolved when the engine starts (they depend on the device and
    the model): ``device`` auto = CUDA when available, else CPU; ``dtype`` auto = bfloat16 on CUDA
    and on a CPU with native bfloat16 arithmetic (AVX-512 BF16 or AMX), else float32;
    ``weight_quant`` auto = on CPU, ``int4`` for a GGUF model whose linear weights are 4-bit
    (its blocks are kept, see ``paged_engine.weight_quant``) and ``int8`` for any other model;
    on CUDA the weights stay as loaded (None; the GPU weight-only kernels are not wired yet);
    ``max_batch_size`` / ``max_num_batched_tokens`` = 256 / 8192 on a GPU and
    64 / 512 on CPU; ``max_model_len`` = the model's context length capped at 8192;
    ``cache_size_limit`` = 0.8 of free accelerator memory after the weights, or on CPU 0.5 of
    available RAM but never more than 4 GiB; ``num_blocks``, when given, overrides the budget.

    Prefix caching: ``enable_prefix_caching`` (default True) reuses the KV of full blocks whose
    tokens (and ``cache_salt``) match a cached prefix exactly; cached blocks stay until memory is
    needed, then ``eviction_policy`` (``lru``, ``lfu`` or ``hybrid``) picks what goes, and
    ``cache_ttl`` (seconds, or None) drops blocks idle that long. ``prefix_match_threshold``
    (in [0, 1]) never makes reuse approximate: it is the fraction of a prompt that must already
    be cached for the request to count as a cache hit; the scheduler admits hits first, and a
    request passed over too often goes first (so nothing starves).

    Disk tier (off by default): with ``kv_disk_dir`` set, cached blocks the pool evicts are
    written to that directory in the background and loaded back when a later prompt continues
    past the in-memory cache, also after a restart. ``kv_disk_size_limit`` (bytes, None = no
    limit) bounds the directory's blocks (least recently used go first); ``cache_ttl`` applies
    to stored blocks too.

    ``revision`` (a branch, tag or commit) picks the snapshot of a Hugging Face Hub ``model``
    id. LMDeploy's ``cache_max_entry_count``, ``session_len`` and ``max_prefill_token_num`` are
    accepted for ``cache_size_limit``, ``max_model_len`` and ``max_num_batched_tokens``, and
    ``tp`` (tensor parallelism) only as 1.

    ``kv_int4_layout`` (used with ``quant_policy=4``): ``"block-channel"`` (default) quantizes
    keys per block, head and channel when a block fills and keeps each running sequence's open
    block exact (a full-precision residual); ``"token"`` quantizes keys per token and head, as
    values (LMDeploy's int4 layout). Block-channel keeps quality (outlier key channels no longer
    widen every token's range) at ~3.0x float16 capacity at block 16 instead of ~3.6x.
    """

    model: str = "default"
    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    block_size: int = 16
    quant_policy: int = 0
    cache_size_limit: float | None = None
    num_blocks: int | None = None
    max_batch_size: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    enable_prefix_caching: bool = True
    eviction_policy: str = "hybrid"
    cache_ttl: float | None = None
    prefix_match_threshold: float = 0.5
    weight_quant: str | None = "auto"
    kv_disk_dir: str | None = None
    kv_disk_size_limit: int | None = None
    revision: str | None = None
    kv_int4_layout: Literal["block-channel", "token"] = "block-channel"
    # LMDeploy's names, accepted for the fields in ``LMDEPLOY_ENGINE_NAMES`` (not stored).
    cache_max_entry_count: InitVar[float | None] = None
    session_len: InitVar[int | None] = None
    max_prefill_token_num: InitVar[int | None] = None
    tp: InitVar[int | None] = None  # tensor parallelism: one device, so only 1

    def __post_init__(
        self,
        cache_max_entry_count: float | None,
        session_len: int | None,
        max_prefill_token_num: int | None,
        tp: int | None,
    ) -> None:
        if tp not in (None, 1) or isinstance(tp, bool):
            raise ValueError(f"EngineConfig: tp={tp!r}: the engine runs on one device; use tp=1")
        given = {
            "cache_max_entry_count": cache_max_entry_count,
            "session_len": session_len,
            "max_prefill_token_num": max_prefill_token_num,
            **{name: getattr(self, name) for name in LMDEPLOY_ENGINE_NAMES.values()},
        }
        given = {k: v for k, v in given.items() if v is not None}
        for name, value in resolve_aliases(given, LMDEPLOY_ENGINE_NAMES, "EngineConfig").items():
            setattr(self, name, value)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(
                "EngineConfig.model must be a non-empty string: 'default', a model directory, "
                "a .gguf file or 'dummy:<preset|config.json>'"
            )
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision):
            raise ValueError(
                f"EngineConfig.revision is a branch, tag or commit of a Hugging Face Hub model "
                f"and must be a non-empty string or None, got {self.revision!r}"
            )
        self._check_device()
        self._check_dtype()
        if self.weight_quant is not None and self.weight_quant not in WEIGHT_QUANT_CHOICES:
            raise ValueError(
                f"EngineConfig.weight_quant must be None (weights as loaded), 'auto', 'int8' "
                f"(per output channel) or 'int4' (groups of 32), got {self.weight_quant!r}"
            )
        _check_int("block_size", self.block_size, minimum=1)
        if self.block_size & (self.block_size - 1):
            raise ValueError(
                f"EngineConfig.block_size must be a power of two (the attention kernels tile by it), "
                f"got {self.block_size}; 16 is the default"
            )
        if self.quant_policy not in QUANT_POLICIES or isinstance(self.quant_policy, bool):
            raise ValueError(
                f"EngineConfig.quant_policy must be 0 (no KV quantization), 8 (int8) or 4 (int4), "
                f"got {self.quant_policy!r}"
            )
        if self.kv_int4_layout not in KV_INT4_LAYOUTS:
            raise ValueError(
                f"EngineConfig.kv_int4_layout must be 'block-channel' (int4 keys per block and "
                f"channel, the default) or 'token' (per token, LMDeploy's layout), got "
                f"{self.kv_int4_layout!r}"
            )
        if self.cache_size_limit is not None:
            if isinstance(self.cache_size_limit, bool) or not isinstance(
                self.cache_size_limit, (int, float)
            ):
                raise ValueError("EngineConfig.cache_size_limit must be a number in (0, 1] or None")
            if not 0.0 < float(self.cache_size_limit) <= 1.0:
                raise ValueError(
                    f"EngineConfig.cache_size_limit is the fraction of free memory given to KV "
                    f"blocks and must be in (0, 1], got {self.cache_size_limit}; use num_blocks "
                    f"to set the pool size directly"
                )
        if self.num_blocks is not None:
            _check_int("num_blocks", self.num_blocks, minimum=1)
        if self.max_batch_size is not None:
            _check_int("max_batch_size", self.max_batch_size, minimum=1)
        if self.max_num_batched_tokens is not None:
            _check_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, minimum=2)
        _check_int("seed", self.seed, minimum=0)
        self._check_prefix_caching()
        self._check_disk_tier()

    def _check_disk_tier(self) -> None:
        if self.kv_disk_dir is not None:
            if isinstance(self.kv_disk_dir, os.PathLike):
                self.kv_disk_dir = os.fspath(self.kv_disk_dir)
            if not isinstance(self.kv_disk_dir, str) or not self.kv_disk_dir:
                raise ValueError(
                    f"EngineConfig.kv_disk_dir must be a directory path or None (no disk tier), "
                    f"got {self.kv_disk_dir!r}"
                )
            if not self.enable_prefix_caching:
                raise ValueError(
                    "EngineConfig.kv_disk_dir needs enable_prefix_caching=True: the disk tier "
                    "holds blocks the prefix cache evicts"
                )
        if self.kv_disk_size_limit is not None:
            _check_int("kv_disk_size_limit", self.kv_disk_size_limit, minimum=1)

    def _check_prefix_caching(self) -> None:
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"EngineConfig.enable_prefix_caching must be True or False, got "
                f"{self.enable_prefix_caching!r}"
            )
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"EngineConfig.eviction_policy must be one of {', '.join(EVICTION_POLICIES)}, "
                f"got {self.eviction_policy!r}"
            )
        if self.cache_ttl is not None and (
            isinstance(self.cache_ttl, bool)
            or not isinstance(self.cache_ttl, (int, float))
            or not 0 < self.cache_ttl < float("inf")
        ):
            raise ValueError(
                f"EngineConfig.cache_ttl is how long (seconds) an unused cached block is kept; it "
                f"must be a positive number or None (no expiry), got {self.cache_ttl!r}"
            )
        t = self.prefix_match_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(
                f"EngineConfig.prefix_match_threshold is the cached fraction of a prompt that "
                f"makes it a cache hit and must be in [0, 1], got {t!r}"
            )

    def _check_device(self) -> None:
        if self.device == "auto":
            return
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"EngineConfig.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}"
            ) from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"EngineConfig.device is {self.device!r} but CUDA is not available; "
                f"use device='cpu' or 'auto'"
            )
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(
                f"EngineConfig.device must be 'cpu' or 'cuda[:N]', got {self.device!r}"
            )

    def _check_dtype(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            ok = self.dtype in DTYPES.values()
        else:
            ok = self.dtype == "auto" or self.dtype in DTYPES
        if not ok:
            raise ValueError(
                f"EngineConfig.dtype must be 'auto', 'float32', 'float16' or 'bfloat16', "
                f"got {self.dtype!r}"
            )

    # -- resolution of automatic values -------------------------------------------------------

    def torch_device(self) -> torch.device:
        """The device the engine runs on (``auto``: CUDA when available, else CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """The weight and activation dtype (``auto``: bfloat16 on CUDA and on CPUs with native
        bfloat16 arithmetic, else float32)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype == "auto":
            native = self.torch_device().type == "cuda" or cpu_has_native_bf16()
            return torch.bfloat16 if native else torch.float32
        return DTYPES[self.dtype]

    def resolved_weight_quant(self, native_4bit: bool) -> str | None:
        """The weight format to run (None: as loaded). ``native_4bit``: the model file's linear
        weights are already 4-bit (a Q4 GGUF). Raises ValueError when ``int8`` / ``int4`` is
        asked for where no kernel runs it (CUDA, or a torch without the CPU kernels)."""
        mode = self.weight_quant
        if mode is None:
            return None
        usable = self.torch_device().type == "cpu" and cpu_weight_quant_kernels()
        if mode == "auto":
            if not usable:
                return None
            return "int4" if native_4bit else "int8"
        if not usable:
            raise ValueError(
                f"EngineConfig.weight_quant={mode!r} runs on CPU only (torch >= 2.6 CPU kernels); "
                f"on {self.torch_device()} use None or 'auto'"
            )
        return mode

    def resolved_max_batch_size(self) -> int:
        if self.max_batch_size is not None:
            return self.max_batch_size
        return GPU_MAX_BATCH_SIZE if self.torch_device().type == "cuda" else CPU_MAX_BATCH_SIZE

    def resolved_max_num_batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if self.torch_device().type == "cuda":
            return GPU_MAX_NUM_BATCHED_TOKENS
        return CPU_MAX_NUM_BATCHED_TOKENS

    def resolved_max_model_len(self, model_max_len: int) -> int:
        """``max_model_len`` if given (it may not exceed the model's), else the model's capped at 8192."""
        if self.max_model_len is None:
            return max(2, min(model_max_len, MAX_MODEL_LEN_CAP))
        if self.max_model_len > model_max_len:
            raise ValueError(
                f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's context "
                f"length {model_max_len}; lower it or leave it unset"
            )
        return self.max_model_len

    def kv_cache_layout(self) -> str:
        """The ``kvquant`` int4 layout the cache uses: ``kv_int4_layout`` under quant_policy 4,
        else ``"token"`` (bits 0 and 8 have one layout)."""
        return self.kv_int4_layout if self.quant_policy == 4 else "token"

    def kv_budget_bytes(self, device: torch.device) -> int:
        """Bytes given to KV blocks when ``num_blocks`` is not set.

        Called after the weights are loaded, so free accelerator memory already excludes them.
        """
        if device.type == "cuda":
            frac = GPU_CACHE_FRACTION if self.cache_size_limit is None else self.cache_size_limit
            return int(free_device_memory(device) * frac)
        frac = CPU_CACHE_FRACTION if self.cache_size_limit is None else self.cache_size_limit
        return int(min(available_host_memory() * frac, CPU_CACHE_CAP_BYTES))

    def replace(self, **changes: object) -> EngineConfig:
        """A copy with some fields changed (validated again); LMDeploy's names are accepted."""
        for alias, name in LMDEPLOY_ENGINE_NAMES.items():
            if alias in changes:
                changes.setdefault(name, None)  # the alias replaces the field's old value
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"EngineConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"EngineConfig.{name} must be >= {minimum}, got {value}")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX), where bfloat16
    matmuls beat float32; elsewhere bfloat16 is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        if probe is not None and probe():
            return True
    if any(getattr(torch.cpu, name, None) is not None for name in probes):
        return False
    try:  # an older torch: ask the kernel
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_weight_quant_kernels() -> bool:
    """True when torch has the CPU weight-only int8 and int4 matmul kernels."""
    ops = torch.ops.aten
    return all(
        hasattr(ops, name)
        for name in (
            "_weight_int8pack_mm",
            "_weight_int4pack_mm_for_cpu",
            "_convert_weight_to_int4pack_for_cpu",
        )
    )


def available_host_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def free_device_memory(device: torch.device) -> int:
    """Free bytes on an accelerator (CPU: available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_memory()
