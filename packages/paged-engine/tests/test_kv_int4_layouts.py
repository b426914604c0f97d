"""int4 KV layouts in the engine: block-channel keys with a residual (the default) and the
per-token layout; prefix caching, chunked prefill and preemption with a residual."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvquant import torch_ops
from paged_engine import EngineConfig, LLMEngine, SamplingParams
from paged_engine.testing import drain

BS = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [
    list(range(3, 30)),  # 27 tokens: 6 reusable blocks
    list(range(3, 23)) + [90, 91, 92],  # shares 5 blocks with the first; its last block partial
    [7] * 16,  # exactly 4 blocks
]


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], tuple[Path, Any]]) -> Path:
    return tiny_model("llama")[0]


def _engine(path: Path, **kw: Any) -> LLMEngine:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", BS)
    kw.setdefault("quant_policy", 4)
    return LLMEngine(EngineConfig(model=str(path), device="cpu", **kw))


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)]


def test_layout_knob_default_and_validation(llama_dir: Path) -> None:
    assert EngineConfig().kv_int4_layout == "block-channel"
    with pytest.raises(ValueError, match="kv_int4_layout"):
        EngineConfig(kv_int4_layout="channel")
    e = _engine(llama_dir, max_batch_size=5)
    assert e.kv_cache.block_channel and e.kv_cache.residual_slots == 5
    assert e.residuals is not None
    tok = _engine(llama_dir, kv_int4_layout="token")
    assert tok.kv_cache.int4_layout == "token" and tok.residuals is None
    int8 = _engine(llama_dir, quant_policy=8)
    assert int8.kv_cache.int4_layout == "token" and int8.residuals is None


def test_caching_on_equals_off_and_shares_only_quantized_blocks(llama_dir: Path) -> None:
    """Greedy outputs with prefix caching on (cold, then warm from cache) equal caching off.
    Between the runs every residual slot is poisoned: reused blocks are full, quantized
    blocks, and a sequence's own partial block (PROMPTS[1]) gets its own residual."""
    off = _run(_engine(llama_dir, enable_prefix_caching=False), PROMPTS)
    on = _engine(llama_dir)
    cold = _run(on, PROMPTS)
    for layer in range(on.kv_cache.num_layers):
        on.kv_cache.k_residual[layer].fill_(float("nan"))
    outs = on.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [24, 20, 12]
    assert cold == off
    assert [o.token_ids for o in outs] == off
    on.step()
    assert on.residuals is not None and on.residuals.num_held == 0


def test_shared_prefix_with_own_partial_last_block(llama_dir: Path) -> None:
    """A sequence reusing 5 cached blocks whose own last block is partial: it holds a residual
    slot for that block while it decodes, and its output equals a cold engine's."""
    on = _engine(llama_dir)
    _run(on, [PROMPTS[0]])
    on.add_request("x", PROMPTS[1], GREEDY)
    on.step()
    seq = on.scheduler.find("x")
    assert seq is not None and seq.num_cached_tokens == 20
    assert on.residuals is not None and on.residuals.slot_of(seq) is not None
    last = seq.block_ids[(len(seq) - 2) // BS]  # the block holding the prompt's last tokens
    assert int(on.kv_cache.residual_map[last]) == on.residuals.slot_of(seq)
    got = drain(on)["x"].token_ids
    assert got == _run(_engine(llama_dir, enable_prefix_caching=False), [PROMPTS[1]])[0]


def test_chunked_prefill_quantizes_each_full_block_once(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 6 tokens end mid-block and fill up to two blocks each: every full block is
    quantized exactly once per layer, and the result stays close to unquantized attention."""
    sealed: list[int] = []
    real = torch_ops.quantize_channels

    def counting(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sealed.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(torch_ops, "quantize_channels", counting)
    prompt = list(range(5, 28))  # 23 tokens: 5 full blocks + 3 tokens
    chunked = _engine(llama_dir, max_num_batched_tokens=6, enable_prefix_caching=False)
    scores = dict(chunked.score(prompt))
    layers = chunked.kv_cache.num_layers
    assert sum(sealed) == layers * (len(prompt) // BS)  # each block once, in every layer
    assert max(sealed) == 2  # a chunk filled two blocks at once

    def logits(e: LLMEngine) -> torch.Tensor:
        return torch.cat([lg for _, lg in sorted(e.score(prompt))])

    got = torch.cat([scores[k] for k in sorted(scores)])
    exact = logits(_engine(llama_dir, quant_policy=0, enable_prefix_caching=False))
    token = logits(_engine(llama_dir, kv_int4_layout="token", enable_prefix_caching=False))
    err = (got - exact).norm() / exact.norm()
    assert err < 0.05 and err < (token - exact).norm() / exact.norm()


def test_preemption_with_a_residual(llama_dir: Path) -> None:
    """The newest sequence is preempted while its open block lives in a residual slot: the slot
    is freed, the sequence is recomputed from a block boundary (its stale residual unread), and
    the run matches one with room for both (no preemption)."""
    prompts = [list(range(5, 19)), list(range(30, 44))]  # 14 tokens: 3 full blocks + 2
    params = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    ]
    roomy = _engine(llama_dir, enable_prefix_caching=False)
    ref = [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    assert roomy.stats().num_preemptions == 0

    e = _engine(llama_dir, num_blocks=10, enable_prefix_caching=False)
    assert e.residuals is not None
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        e.add_request(str(i), p, sp)
    held_at_preemption = []
    done = {}
    while e.has_unfinished():
        holders = {s.request_id: e.residuals.slot_of(s) for s in e.scheduler.running}
        before = e.stats().num_preemptions
        for out in e.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if e.stats().num_preemptions > before:
            victim = e.scheduler.waiting[0]
            held_at_preemption.append(holders.get(victim.request_id))
            assert e.residuals.slot_of(victim) is None  # freed
            # Its poisoned slot must never be read again.
            slot = held_at_preemption[-1]
            if slot is not None:
                for layer in range(e.kv_cache.num_layers):
                    e.kv_cache.k_residual[layer][slot].fill_(float("nan"))
        held = [s for s in e.scheduler.running if e.residuals.slot_of(s) is not None]
        assert e.residuals.num_held <= len(held) + len(done)
        e.check_invariants()
    assert any(s is not None for s in held_at_preemption)
    assert [done["0"], done["1"]] == ref


def test_disk_tier_saves_blocks_not_the_residual() -> None:
    """The residual is indexed by slot: never part of a block's stored payload, even when the
    slot count equals the block count; the per-channel key scales are."""
    import kvquant
    from paged_engine.disk_tier import per_block_tensors

    cache = kvquant.KVCache(2, 4, BS, 2, 16, 4, torch.float32, "cpu", "block-channel", 4)
    names = [n for n, _ in per_block_tensors(cache)]
    assert not any(n.startswith("k_residual") for n in names)
    assert {"k_scale_zero[1]", "v_scale_zero[1]", "k[0]", "v[0]"} <= set(names)
