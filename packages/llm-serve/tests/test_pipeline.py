"""The offline pipeline API over a tiny random model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

import llm_serve
import paged_engine
from llm_serve import EngineConfig, GenerationConfig, Pipeline, Response, pipeline

GREEDY = GenerationConfig(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pipe(tiny_model: str) -> Iterator[Pipeline]:
    with pipeline(tiny_model, backend_config=EngineConfig(device="cpu", num_blocks=256)) as p:
        yield p


def test_public_names() -> None:
    assert GenerationConfig is paged_engine.SamplingParams
    assert llm_serve.EngineConfig is paged_engine.EngineConfig
    assert dataclasses.is_dataclass(Response)


def test_model_argument_wins_over_backend_config(pipe: Pipeline, tiny_model: str) -> None:
    assert pipe.config.model == tiny_model
    assert pipe.config.num_blocks == 256


def test_single_prompt(pipe: Pipeline) -> None:
    r = pipe("hi", gen_config=GREEDY)
    assert isinstance(r, Response)
    assert r.input_token_len == 2
    assert r.generate_token_len == 12 == len(r.token_ids)
    assert r.finish_reason == "length"
    assert isinstance(r.text, str)
    assert r.cached_tokens >= 0
    default = pipe("hi")  # GenerationConfig() defaults: 16 tokens at most
    assert isinstance(default, Response) and default.generate_token_len <= 16


def test_batch_in_order_and_per_prompt_configs(pipe: Pipeline) -> None:
    prompts = ["one", "two two", list(b"three")]
    rs = pipe(prompts, gen_config=GREEDY)
    assert isinstance(rs, list)
    assert [r.input_token_len for r in rs] == [3, 7, 5]
    assert [r.index for r in rs] == [0, 1, 2]
    alone = pipe("two two", gen_config=GREEDY)
    assert isinstance(alone, Response)
    assert rs[1].text == alone.text
    configs = [dataclasses.replace(GREEDY, max_tokens=k) for k in (2, 3, 4)]
    rs = pipe(prompts, gen_config=configs)
    assert [r.generate_token_len for r in rs] == [2, 3, 4]
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(prompts, gen_config=configs[:2])
    # a single list of token ids is one prompt
    one = pipe(list(b"three"), gen_config=GREEDY)
    assert isinstance(one, Response) and one.token_ids[:4] == rs[2].token_ids


def test_stream_infer_yields_deltas(pipe: Pipeline) -> None:
    full = pipe("stream me", gen_config=GREEDY)
    assert isinstance(full, Response)
    deltas = list(pipe.stream_infer("stream me", gen_config=GREEDY))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    lens = [d.generate_token_len for d in deltas]
    assert lens == sorted(lens) and lens[-1] == 12

    batch = list(pipe.stream_infer(["a", "b"], gen_config=GREEDY))
    assert {d.index for d in batch} == {0, 1}
    assert sum(1 for d in batch if d.finish_reason) == 2


def test_closing_a_stream_early_aborts(pipe: Pipeline) -> None:
    gen = pipe.stream_infer("long", gen_config=GenerationConfig(max_tokens=500, ignore_eos=True))
    next(gen)
    gen.close()
    assert not pipe.engine.has_unfinished()
    assert pipe.engine.stats().num_blocks_used == 0


def test_chat_applies_the_template(pipe: Pipeline) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = pipe.chat(messages, gen_config=GREEDY)
    assert isinstance(r, Response)
    templated = "user: hi\nassistant: "
    assert r.input_token_len == len(templated)
    same = pipe(templated, gen_config=GREEDY)
    assert isinstance(same, Response) and same.text == r.text
    as_text = pipe.chat("hi", gen_config=GREEDY)
    assert isinstance(as_text, Response) and as_text.text == r.text
    rs = pipe.chat([messages, [{"role": "user", "content": "bye"}]], gen_config=GREEDY)
    assert isinstance(rs, list) and len(rs) == 2 and rs[0].text == r.text


@pytest.mark.skipif(
    "enable_prefix_caching" not in {f.name for f in dataclasses.fields(EngineConfig)},
    reason="the engine has no prefix caching yet",
)
def test_cached_tokens_on_a_repeated_prefix(pipe: Pipeline) -> None:
    system = "A long shared system prompt. " * 4
    pipe(system + "first", gen_config=GREEDY)
    r = pipe(system + "second", gen_config=GREEDY)
    assert isinstance(r, Response)
    assert r.cached_tokens > 0


def test_invalid_prompt_raises_and_the_pipeline_goes_on(pipe: Pipeline) -> None:
    with pytest.raises(ValueError, match="empty"):
        pipe("", gen_config=GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        pipe("x" * 5000, gen_config=GREEDY)
    assert not pipe.engine.has_unfinished()
    assert isinstance(pipe("ok", gen_config=GREEDY), Response)


def test_close(tiny_model: str) -> None:
    p = pipeline(backend_config=EngineConfig(model=tiny_model, device="cpu", num_blocks=16))
    assert p.config.model == tiny_model
    assert isinstance(p("x", gen_config=GREEDY), Response)
    p.close()
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p("x")
