"""Bad inputs to write/attention raise clear errors before any work is done."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvquant


def make() -> kvquant.KVCache:
    return kvquant.KVCache(2, 4, 16, 2, 64, 8, torch.float16, "cpu")


I32 = torch.int32


def call_write(**over: object) -> None:
    args: dict[str, object] = {
        "cache": make(),
        "layer": 0,
        "k": torch.zeros(3, 2, 64, dtype=torch.float16),
        "v": torch.zeros(3, 2, 64, dtype=torch.float16),
        "slot_mapping": torch.tensor([0, 1, -1]),
        "backend": "torch",
    }
    args.update(over)
    kvquant.write(**args)  # type: ignore[arg-type]


def call_attention(**over: object) -> None:
    args: dict[str, object] = {
        "q": torch.zeros(3, 4, 64, dtype=torch.float16),
        "cache": make(),
        "layer": 1,
        "block_tables": torch.zeros(2, 2, dtype=I32),
        "seq_lens": torch.tensor([5, 1], dtype=I32),
        "query_lens": torch.tensor([2, 1], dtype=I32),
        "softmax_scale": 0.125,
        "backend": "torch",
    }
    args.update(over)
    kvquant.attention(**args)  # type: ignore[arg-type]


def test_valid_calls_pass() -> None:
    call_write()
    call_attention()


@pytest.mark.parametrize(
    ("call", "over", "match"),
    [
        (call_write, {"layer": 2}, r"layer must be an int in \[0, 2\)"),
        (call_write, {"cache": "cache"}, "KVCache"),
        (call_write, {"k": torch.zeros(3, 2, 32, dtype=torch.float16)}, r"k must be \[T, 2, 64\]"),
        (call_write, {"v": torch.zeros(3, 2, 64)}, "cast it first"),
        (call_write, {"v": torch.zeros(2, 2, 64, dtype=torch.float16)}, "tokens"),
        (call_write, {"slot_mapping": torch.tensor([0, 1, 2], dtype=I32)}, "int64"),
        (call_write, {"slot_mapping": torch.tensor([0, 1])}, r"int64 \[3\]"),
        (call_write, {"backend": "cuda"}, "backend"),
        (call_attention, {"q": torch.zeros(3, 3, 64, dtype=torch.float16)}, "multiple"),
        (call_attention, {"q": torch.zeros(3, 4, 32, dtype=torch.float16)}, "head_dim"),
        (call_attention, {"q": torch.zeros(3, 4, 64, dtype=torch.float64)}, "float16"),
        (call_attention, {"seq_lens": torch.tensor([5, 1])}, "seq_lens must be an int32"),
        (call_attention, {"block_tables": torch.zeros(2, dtype=I32)}, "2 dims"),
        (call_attention, {"query_lens": torch.tensor([3], dtype=I32)}, "batch sizes differ"),
        (call_attention, {"query_lens": torch.tensor([1, 1], dtype=I32)}, r"sum\(query_lens\)"),
        (call_attention, {"seq_lens": torch.tensor([40, 1], dtype=I32)}, "block_tables columns"),
        (call_attention, {"query_lens": torch.tensor([0, 3], dtype=I32)}, r"query_len \(3\)"),
        (call_attention, {"softmax_scale": "x"}, "softmax_scale"),
        (call_attention, {"layer": -1}, "layer"),
    ],
)
def test_bad_inputs(call: Callable[..., None], over: dict[str, object], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call(**over)


def test_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        call_write(backend="triton")
    assert kvquant.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert kvquant.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
