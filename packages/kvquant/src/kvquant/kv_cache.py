"""The paged KV cache: per-layer K/V block tensors in the quantized format."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantization import SUPPORTED_BITS, code_dim, scale_zero_dtype

__all__ = ["CACHE_DTYPES", "KVCache"]

#: Dtypes a cache can hold (the dtype of unquantized values and of attention inputs).
CACHE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _per_token_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, bits: int, dtype: torch.dtype
) -> int:
    """Bytes one token occupies over all layers, K and V, scales included."""
    if bits == 0:
        per_head = head_dim * _element_size(dtype)
    else:
        per_head = code_dim(head_dim, bits) + 2 * _element_size(scale_zero_dtype(dtype))
    return 2 * num_layers * num_kv_heads * per_head


def _validate(
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    bits: int,
    dtype: torch.dtype,
) -> None:
    for name, value in (
        ("num_layers", num_layers),
        ("block_size", block_size),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (0 = unquantized), got {bits!r}")
    if bits == 4 and head_dim % 2:
        raise ValueError(
            f"bits 4 packs channels d and d + head_dim/2 in one byte: head_dim must be even, "
            f"got {head_dim}"
        )
    if dtype not in CACHE_DTYPES:
        raise ValueError(
            f"dtype must be one of {', '.join(str(d) for d in CACHE_DTYPES)}, got {dtype!r}"
        )


@dataclass(eq=False)
class KVCache:
    """Paged K/V storage for ``num_layers`` layers (tensors allocated zeroed at construction).

    Per layer ``l``:

    - ``k[l]``, ``v[l]``: ``[num_blocks, block_size, num_kv_heads, D']`` with ``D' = head_dim``
      in ``dtype`` for bits 0, ``D' = head_dim`` uint8 for bits 8, ``D' = head_dim // 2`` uint8
      for bits 4 (channel ``d`` low nibble, ``d + head_dim/2`` high nibble).
    - ``k_scale_zero[l]``, ``v_scale_zero[l]``: ``[num_blocks, block_size, num_kv_heads, 2]``
      ``(scale, min)``, float16 for a float16 cache and float32 otherwise; ``None`` for bits 0.

    Slot ``s`` is block ``s // block_size``, offset ``s % block_size``.

    Raises:
        ValueError: a non-positive size, unsupported ``bits`` or ``dtype``, or odd ``head_dim``
            with bits 4.
    """

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    bits: int
    dtype: torch.dtype = torch.float16
    device: torch.device | str = "cpu"
    k: list[torch.Tensor] = field(init=False, repr=False)
    v: list[torch.Tensor] = field(init=False, repr=False)
    k_scale_zero: list[torch.Tensor | None] = field(init=False, repr=False)
    v_scale_zero: list[torch.Tensor | None] = field(init=False, repr=False)
    _scratch: dict[str, torch.Tensor] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        _validate(
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.bits,
            self.dtype,
        )
        if (
            isinstance(self.num_blocks, bool)
            or not isinstance(self.num_blocks, int)
            or (self.num_blocks < 1)
        ):
            raise ValueError(f"num_blocks must be a positive int, got {self.num_blocks!r}")
        shape = (self.num_blocks, self.block_size, self.num_kv_heads)
        store_dtype = self.dtype if self.bits == 0 else torch.uint8
        width = code_dim(self.head_dim, self.bits)
        self.k = [
            torch.zeros(*shape, width, dtype=store_dtype, device=self.device)
            for _ in range(self.num_layers)
        ]
        self.v = [torch.zeros_like(t) for t in self.k]
        if self.bits == 0:
            self.k_scale_zero = [None] * self.num_layers
            self.v_scale_zero = [None] * self.num_layers
        else:
            sz_dtype = scale_zero_dtype(self.dtype)
            self.k_scale_zero = [
                torch.zeros(*shape, 2, dtype=sz_dtype, device=self.device)
                for _ in range(self.num_layers)
            ]
            self.v_scale_zero = [
                None if t is None else torch.zeros_like(t) for t in self.k_scale_zero
            ]
        # The allocated device, canonical ("cuda" becomes "cuda:0"), so checks compare equal.
        self.device = self.k[0].device

    @property
    def num_slots(self) -> int:
        """Token slots per layer: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable work buffer of ``shape`` on the cache's device (contents undefined).

        The torch attention path gathers K/V into these instead of fresh tensors: allocating
        tens of MiB per layer per step costs more (page faults) than the copy itself. A buffer
        only grows. Not thread-safe, like the cache: one caller at a time."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self._scratch.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:numel].view(shape)

    @property
    def scale_zero_dtype(self) -> torch.dtype | None:
        """Dtype of the ``(scale, min)`` tensors, or None for bits 0."""
        return None if self.bits == 0 else scale_zero_dtype(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes over all layers, K and V, scales included."""
        return _per_token_bytes(
            self.num_layers, self.num_kv_heads, self.head_dim, self.bits, self.dtype
        )

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor the cache holds (``bytes_per_token * num_slots``)."""
        return self.bytes_per_token * self.num_slots

    @classmethod
    def from_memory_budget(
        cls,
        budget_bytes: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        bits: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """The largest cache whose :attr:`total_bytes` fits in ``budget_bytes``.

        Raises:
            ValueError: invalid sizes, or not even one block fits (the message gives the
                bytes one block needs).
        """
        _validate(num_layers, block_size, num_kv_heads, head_dim, bits, dtype)
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
            raise ValueError(f"budget_bytes must be an int, got {budget_bytes!r}")
        per_block = _per_token_bytes(num_layers, num_kv_heads, head_dim, bits, dtype) * block_size
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise ValueError(
                f"a memory budget of {budget_bytes} bytes holds no KV block: one block of "
                f"{block_size} tokens needs {per_block} bytes ({num_layers} layers x K/V x "
                f"{num_kv_heads} kv heads x head_dim {head_dim}, bits {bits}, {dtype}); "
                f"raise the budget or lower block_size"
            )
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, bits, dtype, device)
