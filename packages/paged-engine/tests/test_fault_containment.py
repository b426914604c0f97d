"""One bad request never hurts the others: boundary validation, and faults contained per
request (sampling, post-processing) or per step (the forward pass)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from paged_engine import EngineFailedError, LLMEngine, ParamError, SamplingParams
from paged_engine.sampler import stream_seed
from paged_engine.sampling_params import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SEED_MAX,
    SEED_MIN,
)
from paged_engine.stop_checker import partial_stop_len
from paged_engine.testing import drain

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def model_dir(tiny_model: Callable[[str], tuple[Path, Any]]) -> Path:
    return tiny_model("llama")[0]


def _engine(path: Path, **kw: Any) -> LLMEngine:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    return LLMEngine(model=str(path), device="cpu", **kw)


# -- validation at the boundary ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2**63),
        ("top_k", 2**31),
        ("top_k", -2),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("max_tokens", 2**31),
        ("temperature", float("inf")),
        ("stop", [""]),
        ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
        ("stop", ["y" * (MAX_STOP_STRING_CHARS + 1)]),
        ("stop_token_ids", list(range(1000))),
        ("logprobs", 21),
    ],
)
def test_out_of_range_fields_name_their_param(field: str, value: Any) -> None:
    with pytest.raises(ParamError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert isinstance(info.value, ValueError)


def test_boundary_values_are_accepted() -> None:
    for seed in (SEED_MIN, SEED_MAX, 0):
        SamplingParams(seed=seed)
    SamplingParams(top_k=2**31 - 1, stop=["z" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)


def test_bad_request_is_not_stored(model_dir: Path) -> None:
    """A request that fails validation after construction (fields are mutable) is answered with
    an error and leaves nothing behind: no leaked request keeps the engine busy."""
    engine = _engine(model_dir)
    params = SamplingParams(max_tokens=3, temperature=1.0)
    params.seed = 2**64  # bypasses __post_init__, as a server mutating params could
    engine.add_request("bad", PROMPT, params)
    out = engine.step()
    assert [(o.request_id, o.finish_reason) for o in out] == [("bad", "error")]
    assert "seed" in (out[0].error or "")
    assert not engine.has_unfinished()
    engine.check_invariants()


def test_huge_top_k_samples_like_no_top_k(model_dir: Path) -> None:
    engine = _engine(model_dir)
    base = SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    huge = SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True, top_k=2**31 - 1)
    a, b = engine.generate([PROMPT, PROMPT], [base, huge], use_tqdm=False)
    assert a.token_ids == b.token_ids


def test_seeds_equal_mod_2_32_give_different_streams(model_dir: Path) -> None:
    assert stream_seed(5) != stream_seed(5 + 2**32)
    assert len({stream_seed(s) & 0xFFFFFFFF for s in range(0, 2**40, 2**32)}) == 256
    engine = _engine(model_dir)
    outs = engine.generate(
        [PROMPT] * 3,
        [
            SamplingParams(max_tokens=12, temperature=5.0, seed=s, ignore_eos=True)
            for s in (5, 5 + 2**32, 5)
        ],
        use_tqdm=False,
    )
    assert outs[0].token_ids == outs[2].token_ids  # same seed, same stream
    assert outs[0].token_ids != outs[1].token_ids


def _naive_partial(text: str, stops: list[str]) -> int:
    return max(
        (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
        default=0,
    )


def test_partial_stop_len_matches_naive_definition() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 12)))
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randrange(1, 7)))
            for _ in range(rng.randrange(1, 4))
        ]
        assert partial_stop_len(text, stops) == _naive_partial(text, stops), (text, stops)


# -- fault containment ----------------------------------------------------------------------------


def _raise_for(stage: str, victim: str) -> Callable[[str, str], None]:
    def hook(at: str, request_id: str) -> None:
        if at == stage and request_id == victim:
            raise RuntimeError(f"injected fault at {stage}")

    return hook


@pytest.mark.parametrize("stage", ["sample", "postprocess"])
def test_fault_in_one_request_finishes_only_that_request(model_dir: Path, stage: str) -> None:
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    reference = _engine(model_dir).generate([PROMPT, PROMPT[:5]], greedy, use_tqdm=False)

    engine = _engine(model_dir)
    engine.fault_hook = _raise_for(stage, "victim")
    engine.add_request("ok", PROMPT, greedy)
    engine.add_request("victim", PROMPT, greedy)
    engine.add_request("ok2", PROMPT[:5], greedy)
    done = drain(engine)
    assert done["victim"].finish_reason == "error"
    assert "injected fault" in (done["victim"].error or "")
    assert done["ok"].token_ids == reference[0].token_ids
    assert done["ok2"].token_ids == reference[1].token_ids
    assert engine.stats().num_blocks_used == 0
    # The engine keeps serving after the fault.
    engine.fault_hook = None
    assert engine.generate([PROMPT], greedy, use_tqdm=False)[0].token_ids == reference[0].token_ids


def test_forward_fault_fails_the_step_and_the_engine_goes_on(model_dir: Path) -> None:
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine = _engine(model_dir)
    engine.fault_hook = _raise_for("forward", "victim")
    engine.add_request("victim", PROMPT, greedy)
    done = drain(engine)
    assert done["victim"].finish_reason == "error"
    assert "forward pass" in (done["victim"].error or "")
    engine.fault_hook = None
    out = engine.generate([PROMPT], greedy, use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    engine.check_invariants()


def test_forward_that_keeps_failing_raises_engine_failed(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(model_dir)

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", broken)
    for i in range(5):
        engine.add_request(f"r{i}", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(EngineFailedError, match="device lost"):
        for _ in range(10):
            engine.step()
