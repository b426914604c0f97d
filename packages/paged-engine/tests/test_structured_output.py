"""Structured output: a random-weight model must produce valid output under each constraint."""

from __future__ import annotations

import json
import random
import re
import threading
from typing import Any

import jsonschema
import pytest

from paged_engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutput
from paged_engine.grammars import GrammarCache
from paged_engine.testing import drain, random_json_schema

TINY = {
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
}


@pytest.fixture(scope="module")
def model_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return f"dummy:{path}"


@pytest.fixture(scope="module")
def engine(model_spec: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_spec, device="cpu", num_blocks=1024))


def _stream(engine: LLMEngine, prompts: list[str], params: list[SamplingParams]) -> dict[str, Any]:
    """Run requests step by step; per request id: (final output, concatenated delta texts)."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    deltas: dict[str, str] = {}
    finals: dict[str, Any] = {}
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id] = deltas.get(out.request_id, "") + out.delta_text
            if out.finished:
                finals[out.request_id] = out
        engine.check_invariants()
    return {rid: (finals[rid], deltas[rid]) for rid in finals}


def test_thirty_random_schemas_all_validate(engine: LLMEngine) -> None:
    rng = random.Random(0)
    schemas = [random_json_schema(rng) for _ in range(30)]
    params = [
        SamplingParams(
            max_tokens=1500,
            temperature=1.0,
            seed=i,
            structured_output=StructuredOutput.json_schema(s),
        )
        for i, s in enumerate(schemas)
    ]
    results = _stream(engine, [f"object {i}:" for i in range(30)], params)
    for i, schema in enumerate(schemas):
        out, streamed = results[f"r{i}"]
        assert out.finish_reason == "stop", (schema, out.text, out.error)
        assert streamed == out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_regex_choice_grammar_and_json_object(engine: LLMEngine) -> None:
    cases = [
        (
            StructuredOutput.regex(r"[a-c]{2,4}-\d{3}( ok)?"),
            lambda t: re.fullmatch(r"[a-c]{2,4}-\d{3}( ok)?", t),
        ),
        (
            StructuredOutput.choice(["yes", "no", "peut-être ü"]),
            lambda t: t in ("yes", "no", "peut-être ü"),
        ),
        (
            StructuredOutput.grammar('root ::= "(" [0-9] [0-9]? ")" | "none"'),
            lambda t: re.fullmatch(r"\(\d\d?\)|none", t),
        ),
        (StructuredOutput.json_object(), lambda t: isinstance(json.loads(t), dict)),
    ]
    for so, check in cases:
        for greedy in (True, False):
            params = [
                SamplingParams(
                    max_tokens=3000, temperature=0 if greedy else 1.0, seed=s, structured_output=so
                )
                for s in range(4)
            ]
            for out in engine.generate(["q"] * 4, params, use_tqdm=False):
                assert out.finish_reason == "stop", (so, out.text, out.error)
                assert check(out.text), (so, out.text)


def test_unconstrained_requests_are_unaffected(engine: LLMEngine) -> None:
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = engine.generate("abc", plain, use_tqdm=False)[0].token_ids
    mixed = engine.generate(
        ["abc", "abc"],
        [plain, SamplingParams(max_tokens=12, structured_output=StructuredOutput.regex("[xy]+"))],
        use_tqdm=False,
    )
    assert mixed[0].token_ids == alone
    assert re.fullmatch("[xy]+", mixed[1].text)


def test_bad_and_unsatisfiable_constraints_finish_with_an_error(engine: LLMEngine) -> None:
    bad = [
        StructuredOutput.regex("(unclosed"),
        StructuredOutput.json_schema({"type": "integer", "minimum": 5, "maximum": 3}),
        StructuredOutput.grammar("root ::= missing_rule"),
    ]
    outs = engine.generate(
        ["a"] * 4,
        [SamplingParams(max_tokens=8, structured_output=so) for so in bad]
        + [SamplingParams(max_tokens=8, temperature=0)],
        use_tqdm=False,
    )
    for out in outs[:3]:
        assert out.finish_reason == "error" and "does not compile" in (out.error or "")
        assert out.token_ids == []
    assert outs[3].finish_reason == "length"
    engine.check_invariants()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput.json_schema("{not json")
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutput.choice([])
    with pytest.raises(ValueError, match="kind must be one of"):
        StructuredOutput("yaml", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="structured_output must be"):
        SamplingParams(structured_output={"type": "json_object"})  # type: ignore[arg-type]


def test_grammar_that_cannot_finish_ends_with_length(engine: LLMEngine) -> None:
    so = StructuredOutput.json_schema(
        {
            "type": "object",
            "properties": {"s": {"type": "string", "minLength": 50}},
            "required": ["s"],
        }
    )
    out = engine.generate("x", SamplingParams(max_tokens=20, structured_output=so), use_tqdm=False)[
        0
    ]
    assert out.finish_reason == "length" and len(out.token_ids) == 20
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_terminated_grammar_stops_even_with_ignore_eos(engine: LLMEngine) -> None:
    out = engine.generate(
        "x",
        SamplingParams(
            max_tokens=50, ignore_eos=True, structured_output=StructuredOutput.choice(["done"])
        ),
        use_tqdm=False,
    )[0]
    assert (out.text, out.finish_reason) == ("done", "stop")


def test_stop_strings_n_and_prefix_cache_with_constraints(model_spec: str) -> None:
    engine = LLMEngine(EngineConfig(model=model_spec, device="cpu", num_blocks=256, block_size=4))
    so = StructuredOutput.regex("(ab|cd)+;")
    prompt = "a shared prompt that fills several blocks"
    params = [SamplingParams(max_tokens=60, seed=s, structured_output=so) for s in range(3)]
    first = engine.generate([prompt] * 3, params, use_tqdm=False)
    again = engine.generate([prompt] * 3, params, use_tqdm=False)
    for a, b in zip(first, again, strict=True):
        assert re.fullmatch("(ab|cd)+;", a.text) and a.token_ids == b.token_ids
    assert all(o.num_cached_tokens > 0 for o in again)
    stopped = engine.generate(
        prompt,
        SamplingParams(
            max_tokens=60,
            temperature=0,
            stop=["cd"],
            structured_output=StructuredOutput.regex("(ab)*cd(ab)*;"),
        ),
        use_tqdm=False,
    )[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "cd"
    assert re.fullmatch("(ab)*", stopped.text)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_policy_with_constraints(model_spec: str, bits: int) -> None:
    engine = LLMEngine(
        EngineConfig(model=model_spec, device="cpu", num_blocks=128, quant_policy=bits)
    )
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
    }
    out = engine.generate(
        "q",
        SamplingParams(max_tokens=40, structured_output=StructuredOutput.json_schema(schema)),
        use_tqdm=False,
    )[0]
    jsonschema.validate(json.loads(out.text), schema)


def test_compilation_happens_off_the_step(model_spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request waits outside the scheduler while its grammar compiles; others keep running."""
    release = threading.Event()
    compile_ = GrammarCache._compile

    def slow(self: GrammarCache, constraint: StructuredOutput) -> Any:
        release.wait(30)
        return compile_(self, constraint)

    monkeypatch.setattr(GrammarCache, "_compile", slow)
    engine = LLMEngine(EngineConfig(model=model_spec, device="cpu", num_blocks=64))
    engine.add_request(
        "c", "x", SamplingParams(max_tokens=8, structured_output=StructuredOutput.regex("z{4}"))
    )
    engine.add_request("p", "x", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    done: dict[str, Any] = {}
    for _ in range(10):
        for out in engine.step():
            done[out.request_id] = out
        engine.check_invariants()
        if "p" in done and done["p"].finished:
            break
    assert done["p"].finished and "c" not in done
    assert engine.stats().num_waiting == 1
    release.set()
    done.update(drain(engine))
    assert done["c"].text == "zzzz" and done["c"].finish_reason == "stop"
    # The compiled grammar is cached: the same constraint again is ready at once.
    assert engine.grammars.submit(StructuredOutput.regex("z{4}")).done()


def test_abort_while_compiling(model_spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    compile_ = GrammarCache._compile
    monkeypatch.setattr(
        GrammarCache, "_compile", lambda self, c: (release.wait(30), compile_(self, c))[1]
    )
    engine = LLMEngine(EngineConfig(model=model_spec, device="cpu", num_blocks=64))
    engine.add_request("c", "x", SamplingParams(structured_output=StructuredOutput.regex("q")))
    assert engine.abort("c")
    release.set()
    outs = drain(engine)
    assert outs["c"].finish_reason == "abort" and not engine.has_unfinished()


def test_two_engines_keep_their_own_grammar_caches(model_spec: str, engine: LLMEngine) -> None:
    other = LLMEngine(EngineConfig(model=model_spec, device="cpu", num_blocks=32))
    so = StructuredOutput.choice(["a", "b"])
    assert engine.grammars.submit(so) is not other.grammars.submit(so)
    assert engine.grammars.submit(so) is engine.grammars.submit(StructuredOutput.choice(["a", "b"]))


def test_bitmask_matches_a_token_by_token_reference(engine: LLMEngine) -> None:
    """The masked logits are -inf exactly where the matcher would reject the token; a row
    whose matcher allows nothing is reported dead and left untouched."""
    import torch

    from paged_engine.grammars import apply_grammar_bitmask, new_matcher

    compiled = engine.grammars.submit(StructuredOutput.regex(r"(ab|é)[0-9]{2}")).result()
    matcher = new_matcher(compiled)
    assert matcher.accept_string("ab")
    vocab = engine.model_config.vocab_size
    logits = torch.randn(3, vocab)
    before = logits.clone()

    class Dead:
        def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            bitmask[row] = 0

    dead = apply_grammar_bitmask(logits, [(0, matcher), (2, Dead())], engine.grammars)  # type: ignore[list-item]
    assert dead == [2]
    assert torch.equal(logits[1], before[1]) and torch.equal(logits[2], before[2])
    for t in range(vocab):
        probe = matcher.fork()
        allowed = t < 257 and probe.accept_token(t)
        assert (logits[0, t] == before[0, t]) if allowed else logits[0, t] == float("-inf"), t
    assert torch.isfinite(logits[0]).sum() == 10  # the ten digits
