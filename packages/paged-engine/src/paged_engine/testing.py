"""Helpers for checking the engine against transformers (used by this package's tests and by
integration tests elsewhere). Importing this module imports nothing beyond torch."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .llm_engine import LLMEngine
    from .outputs import RequestOutput

__all__ = [
    "assert_greedy_match",
    "drain",
    "first_mismatch",
    "hf_greedy",
    "random_json_schema",
]


def drain(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step ``engine`` until nothing is unfinished, asserting its block accounting after every
    step; returns the final output of each request that finished, by request id."""
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
    return done


def hf_greedy(
    model: Any, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation of one prompt (no early stop on eos unless the model's
    generation config asks for it), and the raw logits ``[V]`` of every generated position."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device=model.device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return [int(t) for t in tokens], [lg[0].float().cpu() for lg in out.logits]


def first_mismatch(got: list[int], ref: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None."""
    for i, (a, b) in enumerate(zip(got, ref, strict=False)):
        if a != b:
            return i
    return None if len(got) == len(ref) else min(len(got), len(ref))


def assert_greedy_match(
    got: list[int], ref: list[int], ref_logits: list[torch.Tensor], tie_margin: float = 1e-4
) -> None:
    """Assert ``got`` equals the greedy reference ``ref``.

    Where they first differ, the reference's top-2 logit margin at that step must be below
    ``tie_margin`` (a genuine near-tie that float rounding may flip); later tokens are not
    compared, since the two continuations have diverged.
    """
    i = first_mismatch(got, ref)
    if i is None:
        return
    if i >= min(len(got), len(ref)):
        raise AssertionError(
            f"lengths differ: got {len(got)}, reference {len(ref)}\n got {got}\n ref {ref}"
        )
    top2 = ref_logits[i].topk(2).values
    margin = float(top2[0] - top2[1])
    if margin >= tie_margin:
        raise AssertionError(
            f"token {i} differs ({got[i]} vs reference {ref[i]}) and the reference's top-2 "
            f"logit margin there is {margin:.3g}, not a near-tie (< {tie_margin})\n"
            f" got {got}\n ref {ref}"
        )


def random_json_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A random JSON schema for structured-output tests: an object at the top, nesting up to
    three levels of objects and arrays (bounded item counts), enums, bounded integers, strings of
    bounded length, booleans, and required fields. Small enough that a random-weight model under
    the constraint finishes in a few hundred byte tokens."""
    kinds = ["integer", "string", "enum", "boolean"]
    if depth < 3:
        kinds += ["object", "array", "object"]
    kind = rng.choice(kinds) if depth else "object"
    if kind == "integer":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if kind == "string":
        lo = rng.randint(0, 2)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 6)}
    if kind == "enum":
        pool: list[Any] = ["red", "green", "blue", 'say "hi"', 7, -1, None, True]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {
            "type": "array",
            "items": random_json_schema(rng, depth + 1),
            "minItems": rng.randint(0, 1),
            "maxItems": rng.randint(1, 3),
        }
    names = rng.sample(["id", "name", "tags", "size", "meta", "ok", "kind", "x"], rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {n: random_json_schema(rng, depth + 1) for n in names},
        "required": rng.sample(names, rng.randint(1, len(names))),
    }
