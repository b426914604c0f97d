"""The paged KV cache: per-layer K/V block tensors in the quantized format."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantization import SUPPORTED_BITS, code_dim, scale_zero_dtype

__all__ = ["CACHE_DTYPES", "INT4_LAYOUTS", "KVCache"]

#: Dtypes a cache can hold (the dtype of unquantized values and of attention inputs).
CACHE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

#: Layouts of int4 keys: ``"token"`` (per token and head, as values) or ``"block-channel"``
#: (per block, head and channel, with a full-precision residual for a block not yet full).
INT4_LAYOUTS: tuple[str, ...] = ("token", "block-channel")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _per_block_bytes(
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    bits: int,
    dtype: torch.dtype,
    int4_layout: str,
) -> int:
    """Bytes one block occupies over all layers, K and V, scales included (and, for the
    block-channel layout, its per-channel key scales and its entry of the residual map)."""
    if bits == 0:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * _element_size(dtype)
    sz = 2 * _element_size(scale_zero_dtype(dtype))
    codes = code_dim(head_dim, bits)
    per_token = (codes + sz) * num_kv_heads * num_layers  # one of K or V, per token
    if int4_layout == "token":
        return 2 * per_token * block_size
    k_scales = num_layers * num_kv_heads * head_dim * sz
    return per_token * block_size + codes * num_kv_heads * num_layers * block_size + k_scales + 4


def _residual_bytes(
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    residual_slots: int,
) -> int:
    """Bytes of the full-precision key residual: ``residual_slots`` blocks per layer."""
    return residual_slots * num_layers * block_size * num_kv_heads * head_dim * _element_size(dtype)


def _validate(
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    bits: int,
    dtype: torch.dtype,
    int4_layout: str = "token",
    residual_slots: int = 0,
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
    if int4_layout not in INT4_LAYOUTS:
        raise ValueError(f"int4_layout must be one of {INT4_LAYOUTS}, got {int4_layout!r}")
    if isinstance(residual_slots, bool) or not isinstance(residual_slots, int):
        raise ValueError(f"residual_slots must be an int, got {residual_slots!r}")
    if int4_layout == "block-channel":
        if bits != 4:
            raise ValueError(
                f"int4_layout 'block-channel' is a layout of bits 4, got bits {bits}; "
                "use int4_layout='token' for bits 0 and 8"
            )
        if residual_slots < 1:
            raise ValueError(
                "int4_layout 'block-channel' keeps the keys of each block that is not yet full "
                "in a residual slot: residual_slots must be >= 1 (one per running sequence), "
                f"got {residual_slots}"
            )
    elif residual_slots != 0:
        raise ValueError(
            f"residual_slots is for int4_layout 'block-channel' only; got {residual_slots} with "
            f"int4_layout {int4_layout!r}"
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

    With ``int4_layout="block-channel"`` (bits 4 only) the keys differ:

    - ``k_scale_zero[l]`` is ``[num_blocks, num_kv_heads, head_dim, 2]``: one ``(scale, min)``
      per block, head and channel over the block's tokens, written when the block fills.
    - ``k_residual[l]``: ``[residual_slots, block_size, num_kv_heads, head_dim]`` in ``dtype``:
      the exact keys of blocks not yet full; ``residual_map`` (int32 ``[num_blocks]``, shared by
      the layers, -1 = none) says which residual slot holds block ``b``'s keys. The caller
      assigns slots with :meth:`assign_residual` before writing into a block it will leave
      partial; a block is read from its residual slot exactly while it is a sequence's last,
      partial block (``seq_len`` not a multiple of ``block_size``).

    Slot ``s`` is block ``s // block_size``, offset ``s % block_size``.

    Raises:
        ValueError: a non-positive size, unsupported ``bits``, ``dtype`` or ``int4_layout``,
            odd ``head_dim`` with bits 4, or ``residual_slots`` that do not fit the layout.
    """

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    bits: int
    dtype: torch.dtype = torch.float16
    device: torch.device | str = "cpu"
    int4_layout: str = "token"
    residual_slots: int = 0
    k: list[torch.Tensor] = field(init=False, repr=False)
    v: list[torch.Tensor] = field(init=False, repr=False)
    k_scale_zero: list[torch.Tensor | None] = field(init=False, repr=False)
    v_scale_zero: list[torch.Tensor | None] = field(init=False, repr=False)
    k_residual: list[torch.Tensor] = field(init=False, repr=False)
    residual_map: torch.Tensor = field(init=False, repr=False)
    _scratch: dict[str, torch.Tensor] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        _validate(
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.bits,
            self.dtype,
            self.int4_layout,
            self.residual_slots,
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
            self.v_scale_zero = [
                torch.zeros(*shape, 2, dtype=sz_dtype, device=self.device)
                for _ in range(self.num_layers)
            ]
            k_sz_shape = (
                (self.num_blocks, self.num_kv_heads, self.head_dim, 2)
                if self.block_channel
                else (*shape, 2)
            )
            self.k_scale_zero = [
                torch.zeros(k_sz_shape, dtype=sz_dtype, device=self.device)
                for _ in range(self.num_layers)
            ]
        res_shape = (self.residual_slots, self.block_size, self.num_kv_heads, self.head_dim)
        self.k_residual = (
            [torch.zeros(res_shape, dtype=self.dtype, device=self.device) for _ in self.k]
            if self.block_channel
            else []
        )
        self.residual_map = torch.full(
            (self.num_blocks if self.block_channel else 0,),
            -1,
            dtype=torch.int32,
            device=self.device,
        )
        # The allocated device, canonical ("cuda" becomes "cuda:0"), so checks compare equal.
        self.device = self.k[0].device

    @property
    def rotates_values(self) -> bool:
        """True when values are stored Hadamard-rotated: the block-channel layout with a
        power-of-two ``head_dim``. ``write`` stores ``v @ R`` and ``attention`` returns
        ``(P @ v_stored) @ R``, with ``R`` the orthonormal (and symmetric, so self-inverse)
        Hadamard matrix: a value's outlier channels are spread over all channels, so per-token
        int4 steps shrink. Transparent to callers of ``write`` and ``attention``."""
        d = self.head_dim
        return self.block_channel and d & (d - 1) == 0

    def value_rotation(self) -> torch.Tensor:
        """The float32 ``[head_dim, head_dim]`` orthonormal Hadamard matrix (built once).

        Raises:
            ValueError: the cache does not rotate values.
        """
        if not self.rotates_values:
            raise ValueError("only block-channel caches with a power-of-two head_dim rotate values")
        r = self._scratch.get("value rotation")
        if r is None:
            r = torch.ones(1, 1)
            while r.shape[0] < self.head_dim:
                r = torch.cat([torch.cat([r, r], 1), torch.cat([r, -r], 1)], 0)
            r = (r / self.head_dim**0.5).to(self.device)
            self._scratch["value rotation"] = r
        return r

    @property
    def block_channel(self) -> bool:
        """True for the block-channel int4 key layout (with its residual)."""
        return self.int4_layout == "block-channel"

    @property
    def num_slots(self) -> int:
        """Token slots per layer: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    def assign_residual(self, block_ids: list[int], slots: list[int]) -> None:
        """Point each block ``block_ids[i]`` at residual slot ``slots[i]`` (block-channel only).

        A ``write`` that leaves block ``b`` partial stores its keys in slot
        ``residual_map[b]``; when a later write fills the block, its earlier keys are read from
        that slot and the whole block is quantized. Several blocks may share a slot as long as
        at most one of them is partial after each write (a sequence's block that fills this
        step and its next, partial one). Entries of full blocks are never read.

        Raises:
            ValueError: not the block-channel layout, lengths differ, or ids out of range.
        """
        if not self.block_channel:
            raise ValueError("assign_residual is for int4_layout 'block-channel' caches only")
        if len(block_ids) != len(slots):
            raise ValueError(f"{len(block_ids)} block ids but {len(slots)} residual slots")
        if not block_ids:
            return
        if not all(0 <= b < self.num_blocks for b in block_ids):
            raise ValueError(f"block ids must be in [0, {self.num_blocks}), got {block_ids}")
        if not all(0 <= r < self.residual_slots for r in slots):
            raise ValueError(f"residual slots must be in [0, {self.residual_slots}), got {slots}")
        idx = torch.tensor(block_ids, dtype=torch.int64).to(self.device)
        val = torch.tensor(slots, dtype=torch.int32).to(self.device)
        self.residual_map.index_copy_(0, idx, val)

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
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all layers, K and V, scales included."""
        return _per_block_bytes(
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.bits,
            self.dtype,
            self.int4_layout,
        )

    @property
    def bytes_per_token(self) -> float:
        """``bytes_per_block / block_size``: what one token costs in the block pool (a
        fraction for the block-channel layout, whose key scales are per block)."""
        return self.bytes_per_block / self.block_size

    @property
    def residual_bytes(self) -> int:
        """Bytes of the key residual (block-channel layout; 0 otherwise): a fixed cost."""
        return _residual_bytes(
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.residual_slots,
        )

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor the cache holds (``bytes_per_block * num_blocks`` plus the
        residual)."""
        return self.bytes_per_block * self.num_blocks + self.residual_bytes

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
        int4_layout: str = "token",
        residual_slots: int = 0,
    ) -> KVCache:
        """The largest cache whose :attr:`total_bytes` fits in ``budget_bytes`` (the residual
        of the block-channel layout is paid first).

        Raises:
            ValueError: invalid sizes, or not even one block fits (the message gives the
                bytes one block needs).
        """
        _validate(
            num_layers, block_size, num_kv_heads, head_dim, bits, dtype, int4_layout, residual_slots
        )
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
            raise ValueError(f"budget_bytes must be an int, got {budget_bytes!r}")
        per_block = _per_block_bytes(
            num_layers, block_size, num_kv_heads, head_dim, bits, dtype, int4_layout
        )
        fixed = _residual_bytes(
            num_layers, block_size, num_kv_heads, head_dim, dtype, residual_slots
        )
        num_blocks = (budget_bytes - fixed) // per_block
        if num_blocks < 1:
            residual = f" after a key residual of {fixed} bytes" if fixed else ""
            raise ValueError(
                f"a memory budget of {budget_bytes} bytes holds no KV block{residual}: one block "
                f"of {block_size} tokens needs {per_block} bytes ({num_layers} layers x K/V x "
                f"{num_kv_heads} kv heads x head_dim {head_dim}, bits {bits}, {dtype}); "
                f"raise the budget or lower block_size"
            )
        return cls(
            num_layers,
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            bits,
            dtype,
            device,
            int4_layout,
            residual_slots,
        )
