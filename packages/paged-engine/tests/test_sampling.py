"""The sampler on fixed distributions: filters restrict the support (statistically), penalties
match a hand computation, greedy equivalences, logprobs; and SamplingParams validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from paged_engine import SamplingParams
from paged_engine.sampler import Sampler, apply_penalties, filter_logits, top_logprobs

CPU = torch.device("cpu")
# A fixed distribution over 8 tokens (listed most likely first, then shuffled into the vocab).
PROBS = [0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.015, 0.005]
ORDER = [5, 2, 7, 0, 3, 6, 1, 4]  # token id of the i-th most likely entry


def _logits(rows: int = 1) -> torch.Tensor:
    row = torch.full((8,), float("-inf"))
    for p, tok in zip(PROBS, ORDER, strict=True):
        row[tok] = math.log(p)
    return row.repeat(rows, 1)


def _frequencies(params: SamplingParams, n: int = 6000, seed: int = 0) -> torch.Tensor:
    """Sample ``n`` rows of the fixed distribution in one batched call (shared generator)."""
    sampler = Sampler(CPU, seed)
    out = sampler(_logits(n), [params] * n, [None] * n)
    return torch.bincount(torch.tensor(out.token_ids), minlength=8).double() / n


def _expected(keep: int) -> torch.Tensor:
    """The fixed distribution restricted to its ``keep`` most likely tokens, renormalized."""
    exp = torch.zeros(8, dtype=torch.float64)
    total = sum(PROBS[:keep])
    for p, tok in zip(PROBS[:keep], ORDER[:keep], strict=True):
        exp[tok] = p / total
    return exp


@pytest.mark.parametrize(
    ("kwargs", "keep"),
    [
        ({}, 8),
        ({"top_k": 3}, 3),
        ({"top_k": 0}, 8),
        ({"top_p": 0.7}, 3),  # 0.40 + 0.25 < 0.7: the third token crosses it and is kept
        ({"top_p": 0.35}, 1),
        ({"min_p": 0.2}, 4),  # probability >= 0.2 * 0.40 = 0.08
        ({"top_k": 5, "top_p": 0.9}, 4),  # after top-k: 0.4/0.95 + ... reaches 0.9 at the 4th
        ({"min_p": 0.1, "top_k": 6}, 5),
    ],
)
def test_filters_restrict_the_support(kwargs: dict[str, Any], keep: int) -> None:
    n = 6000
    freq = _frequencies(SamplingParams(temperature=1.0, **kwargs), n)
    exp = _expected(keep)
    assert torch.all(freq[exp == 0] == 0), f"sampled outside the support: {freq}"
    # Each frequency within 5 standard deviations of its expectation.
    sigma = torch.sqrt(exp * (1 - exp) / n)
    assert torch.all((freq - exp).abs() <= 5 * sigma + 1e-12), f"{freq} vs {exp}"


def test_temperature_sharpens_and_flattens() -> None:
    cold = _frequencies(SamplingParams(temperature=0.5))
    hot = _frequencies(SamplingParams(temperature=2.0))
    top = ORDER[0]
    assert cold[top] > 0.5 > 0.4 > hot[top]


def test_filter_logits_rows_are_independent() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([50, 1, 10, 50])
    p = torch.tensor([1.0, 1.0, 1.0, 0.5])
    m = torch.tensor([0.0, 0.0, 0.0, 0.0])
    out = filter_logits(logits, k, p, m)
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).sum() == 1 and out[1].argmax() == logits[1].argmax()
    assert torch.isfinite(out[2]).sum() == 10
    kept = torch.isfinite(out[2])
    assert torch.equal(out[2][kept], logits[2][kept])
    assert logits[2][kept].min() >= logits[2][~kept].max()
    probs = torch.softmax(logits[3], -1)
    kept3 = torch.isfinite(out[3])
    # The smallest set reaching 0.5: without its least likely member it falls short.
    assert probs[kept3].sum() >= 0.5 > probs[kept3].sum() - probs[kept3].min()


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 300, generator=gen) * 3
    greedy = logits.argmax(-1).tolist()
    sampler = Sampler(CPU, 0)
    for p in (
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.0, top_k=1, seed=3),
        SamplingParams(temperature=0.0, top_k=7, top_p=0.3),
    ):
        gens = [sampler.request_generator(p) for _ in range(16)]
        assert sampler(logits, [p] * 16, gens).token_ids == greedy


def test_penalties_match_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompt, output = [[0, 1]], [[3, 3, 2]]
    got = apply_penalties(
        logits,
        prompt,
        output,
        repetition_penalty=torch.tensor([2.0]),
        presence_penalty=torch.tensor([0.5]),
        frequency_penalty=torch.tensor([0.25]),
    )
    expected = [
        2.0 / 2,  # in the prompt, positive: divided
        -1.0 * 2,  # in the prompt, negative: multiplied
        0.5 / 2 - 0.25 * 1 - 0.5,  # output once: repetition, frequency x1, presence
        3.0 / 2 - 0.25 * 2 - 0.5,  # output twice
        -2.0,  # never seen
        1.0,
    ]
    assert torch.allclose(got, torch.tensor([expected]))


def test_penalties_in_a_mixed_batch() -> None:
    # Row 0 greedy without penalties, row 1 greedy with penalties that move the argmax, row 2 a
    # negative presence penalty (encourages repeats).
    base = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    logits = base.repeat(3, 1)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(
            temperature=0, repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5
        ),
        SamplingParams(temperature=0, presence_penalty=-2.0),
    ]
    prompts = [[0, 1], [0, 1], [0]]
    outputs = [[3, 3, 2], [3, 3, 2], [5]]
    sampler = Sampler(CPU, 0)
    out = sampler(logits, params, [None] * 3, prompts, outputs)
    # Row 1 after penalties: [1.0, -2.0, -0.5, 0.5, -2.0, 1.0] -> argmax 0 (first of a tie).
    # Row 2: token 5 gets 1.0 + 2.0 = 3.0, tying token 3 (3.0): argmax keeps the first.
    assert out.token_ids == [3, 0, 3]
    assert torch.equal(logits, base.repeat(3, 1))  # not modified in place
    with pytest.raises(ValueError, match="penalties need"):
        sampler(logits, params, [None] * 3)


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(2))
    sampler = Sampler(CPU, 0)
    p = SamplingParams(temperature=0.9, top_p=0.8, top_k=20, min_p=0.01, seed=11)
    alone = sampler(logits[2:3], [p], [sampler.request_generator(p)]).token_ids[0]
    others = [SamplingParams(temperature=1.0)] * 6
    params = [*others[:2], p, *others[3:]]
    gens = [sampler.request_generator(q) for q in params]
    assert sampler(logits, params, gens).token_ids[2] == alone


def test_logprobs_are_raw_log_softmax_with_the_chosen_token_first() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    sampler = Sampler(CPU, 0)
    params = [
        SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, logprobs=0, seed=1),
        SamplingParams(temperature=1.0),
    ]
    out = sampler(
        logits, params, [None, sampler.request_generator(params[1]), None], [[1]] * 3, [[2]] * 3
    )
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    e0, e1 = out.logprobs[0], out.logprobs[1]
    assert e0 is not None and e1 is not None
    assert list(e1) == [out.token_ids[1]]
    assert next(iter(e0)) == out.token_ids[0]
    top3 = ref[0].topk(3).indices.tolist()
    assert set(e0) == {out.token_ids[0], *top3}
    for row, entry in ((0, e0), (1, e1)):
        for tok, lp in entry.items():
            assert lp == pytest.approx(float(ref[row, tok]), abs=1e-5)
    # Entries after the chosen one are in descending order.
    rest = list(e0.values())[1:]
    assert rest == sorted(rest, reverse=True)
    per_row = top_logprobs(logits[:2], torch.tensor([0, 0]), [1, 4])
    assert len(per_row[0]) in (1, 2) and len(per_row[1]) in (4, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1 or 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"logprobs": -1}, "logprobs must be None"),
        ({"logprobs": 21}, "logprobs must be at most 20"),
        ({"prompt_logprobs": 100}, "prompt_logprobs must be at most 20"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"stop": ["ok", 3]}, "stop must be a string or a list of strings"),
        ({"stop": [""]}, "must not be empty"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids must be a list"),
        ({"max_tokens": 0}, r"max_tokens must be an integer in \[1, 2147483647\]"),
        ({"seed": 1.5}, "seed must be None or an integer"),
    ],
)
def test_validation_messages(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_defaults_and_normalization() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.stop is None and p.logprobs is None and p.prompt_logprobs is None
    assert not p.has_penalties and p.stop_strings == []
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(top_k=0).top_k == 0
