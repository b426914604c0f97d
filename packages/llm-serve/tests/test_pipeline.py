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
    assert issubclass(GenerationConfig, paged_engine.SamplingParams)
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
    default = pipe("hi")  # LMDeploy's defaults: greedy, at most 512 new tokens
    assert isinstance(default, Response) and default.generate_token_len <= 512
    n = min(12, default.generate_token_len)
    assert default.token_ids[:n] == r.token_ids[:n]


def test_lmdeploy_generation_config_names() -> None:
    lm = GenerationConfig(
        max_new_tokens=7, min_new_tokens=2, do_sample=True, random_seed=5, stop_words=["x"]
    )
    assert (lm.max_tokens, lm.min_tokens, lm.temperature, lm.seed, lm.stop) == (7, 2, 1.0, 5, ["x"])
    assert GenerationConfig(do_sample=False, top_p=0.5).temperature == 0
    assert (GenerationConfig().max_tokens, GenerationConfig().temperature) == (512, 0)
    assert GenerationConfig(max_new_tokens=3, max_tokens=3).max_tokens == 3  # agreeing: fine
    for bad in (
        {"max_new_tokens": 3, "max_tokens": 4},
        {"random_seed": 1, "seed": 2},
        {"stop_words": ["a"], "stop": ["b"]},
        {"min_new_tokens": 1, "min_tokens": 2},
        {"do_sample": False, "temperature": 0.7},
        {"do_sample": True, "temperature": 0},
    ):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        GenerationConfig(max_new_token=3)  # a misspelt name is not ignored
    again = dataclasses.replace(lm, seed=9)
    assert isinstance(again, GenerationConfig) and (again.seed, again.max_tokens) == (9, 7)


def test_message_lists_and_logprobs(pipe: Pipeline) -> None:
    conversation = [{"role": "user", "content": "hi"}]
    chat = pipe.chat(conversation, gen_config=GREEDY)
    one = pipe(conversation, gen_config=GREEDY)
    batch = pipe([conversation, "plain"], gen_config=GREEDY)
    assert isinstance(chat, Response) and isinstance(one, Response) and isinstance(batch, list)
    assert one.text == chat.text == batch[0].text and batch[1].input_token_len == 5
    with_lp = pipe("hi", gen_config=dataclasses.replace(GREEDY, logprobs=2))
    assert isinstance(with_lp, Response) and with_lp.logprobs is not None
    assert len(with_lp.logprobs) == 12 and all(len(e) >= 2 for e in with_lp.logprobs)
    assert [next(iter(e)) for e in with_lp.logprobs] == with_lp.token_ids
    deltas = list(pipe.stream_infer("hi", gen_config=dataclasses.replace(GREEDY, logprobs=2)))
    assert [e for d in deltas for e in d.logprobs or []] == with_lp.logprobs
    assert one.logprobs is None


def test_lmdeploy_engine_names(tiny_model: str) -> None:
    with pytest.raises(ValueError, match="session_len"):
        pipeline(tiny_model, session_len=32, max_model_len=64)
    config = EngineConfig(device="cpu", num_blocks=16)
    with pipeline(tiny_model, config, session_len=64, max_prefill_token_num=32) as p:
        assert (p.config.max_model_len, p.config.max_num_batched_tokens) == (64, 32)
        assert p.engine.max_model_len == 64


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
