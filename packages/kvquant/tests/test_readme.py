"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_readme_usage_example_runs() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python example"
    scope: dict[str, object] = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)
    out = scope["out"]
    assert isinstance(out, torch.Tensor) and out.shape == (21, 6, 64)
    x_hat, k = scope["x_hat"], scope["k"]
    assert isinstance(x_hat, torch.Tensor) and isinstance(k, torch.Tensor)
    assert (x_hat - k).abs().max() < 1.0  # int4: half a step of a ~range/15 grid


def test_readme_block_channel_example_runs() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "block-channel" in b)
    scope: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), scope)
    out, block5, k = scope["out"], scope["block5"], scope["k"]
    assert isinstance(out, torch.Tensor) and out.shape == (25, 4, 64) and torch.isfinite(out).all()
    assert isinstance(block5, torch.Tensor) and isinstance(k, torch.Tensor)
    # Per-channel steps over 16 tokens: within half a step of each channel's range / 15.
    x = k[:16]
    assert ((block5 - x).abs() <= (x.amax(0) - x.amin(0)) / 30 + 1e-5).all()
