"""Greedy decoding matches transformers (float32, one prompt at a time) for every supported
architecture, batched, with chunked prefill and under forced preemption."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paged_engine import EngineConfig, LLMEngine, SamplingParams
from paged_engine.testing import assert_greedy_match, hf_greedy

TINY_MODELS = ["llama", "llama-tied-llama3", "mistral", "qwen2-yarn", "qwen3", "qwen3-linear"]

MAX_NEW = 12
# The exact path every parity test pins: float32 compute, weights as loaded.
EXACT: dict[str, Any] = {"dtype": "float32", "weight_quant": None}


def _prompts(vocab: int = 128) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (1, 7, 16, 23, 40)]


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    engine.check_invariants()
    assert engine.stats().num_blocks_used == 0
    return [o.token_ids for o in outs]


SCENARIOS: dict[str, dict[str, Any]] = {
    # Everything in one batch, whole prompts prefilled in one step.
    "batched": {"block_size": 16, "num_blocks": 64},
    # Prompts prefilled in chunks of at most 5 tokens across steps, mixed with decodes.
    "chunked": {"block_size": 4, "num_blocks": 128, "max_num_batched_tokens": 5},
    # 16 blocks of 4 tokens cannot hold the five sequences at once: some get preempted.
    "preempted": {"block_size": 4, "num_blocks": 16, "max_num_batched_tokens": 24},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("name", TINY_MODELS)
def test_greedy_matches_transformers(
    tiny_model: Callable[[str], tuple[Path, Any]], name: str, scenario: str
) -> None:
    path, hf = tiny_model(name)
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", **EXACT, **SCENARIOS[scenario]))
    prompts = _prompts()
    got = _run(engine, prompts)
    if scenario == "preempted":
        assert engine.stats().num_preemptions > 0
    for prompt, tokens in zip(prompts, got, strict=True):
        ref, logits = hf_greedy(hf, prompt, MAX_NEW)
        assert_greedy_match(tokens, ref, logits)


def test_one_prompt_at_a_time_equals_batched(tiny_model: Callable[[str], tuple[Path, Any]]) -> None:
    path, _ = tiny_model("llama")
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", num_blocks=64))
    prompts = _prompts()
    batched = _run(engine, prompts)
    single = [_run(engine, [p])[0] for p in prompts]
    assert batched == single
