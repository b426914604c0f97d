"""What the engine reports per request: stop strings and stop tokens, streamed text (deltas,
multi-byte characters), logprobs and prompt logprobs against transformers, teacher-forced
scoring. Tiny random models; the byte-level tokenizer (one token per UTF-8 byte)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from paged_engine import ByteTokenizer, EngineConfig, LLMEngine, RequestOutput, SamplingParams
from paged_engine.detokenizer import IncrementalDetokenizer
from paged_engine.stop_checker import find_stop, partial_stop_len

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def llama(tiny_model: Callable[[str], tuple[Path, Any]]) -> tuple[Path, Any]:
    return tiny_model("llama")


def _engine(path: Path | str, **kw: Any) -> LLMEngine:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    # Compared with transformers in float32: the exact path.
    kw.setdefault("dtype", "float32")
    kw.setdefault("weight_quant", None)
    return LLMEngine(EngineConfig(model=str(path), device="cpu", **kw))


def _stream(
    engine: LLMEngine, prompts: list[Any], params: SamplingParams | list[SamplingParams]
) -> dict[str, list[RequestOutput]]:
    """Run requests to the end; every output of each request, in order."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    seen: dict[str, list[RequestOutput]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out)
        engine.check_invariants()
    return seen


def _check_stream(outs: list[RequestOutput]) -> str:
    """Text only grows by appending, deltas add up to it; returns the final text."""
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    text = ""
    for o in outs:
        assert o.text.startswith(text), (text, o.text)
        assert o.text == text + o.delta_text
        text = o.text
    return text


def _reference(path: Path, n: int = 30) -> tuple[list[int], str]:
    out = _engine(path).generate(
        [PROMPT], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    return out.token_ids, out.text


# -- stop strings and stop tokens ----------------------------------------------------------------


def test_stop_string_split_across_tokens_is_caught_and_cut(llama: tuple[Path, Any]) -> None:
    ref_ids, ref_text = _reference(llama[0])
    assert ref_text == ByteTokenizer().decode(ref_ids)  # one token per character (ASCII)
    stop = ref_text[10:14]  # four tokens
    cut = ref_text.find(stop)
    outs = _stream(
        _engine(llama[0]),
        [PROMPT],
        SamplingParams(max_tokens=30, temperature=0, stop=[stop, "\x7f\x7f\x7f"], ignore_eos=True),
    )["r0"]
    final = outs[-1]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == ref_text[:cut]
    assert final.token_ids == ref_ids[: cut + len(stop)]  # ends with the token completing it
    assert _check_stream(outs) == final.text
    assert not any(stop in o.text for o in outs)

    kept = _engine(llama[0]).generate(
        [PROMPT],
        SamplingParams(max_tokens=30, temperature=0, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0]
    assert kept.text == ref_text[: cut + len(stop)] and kept.finish_reason == "stop"


def test_partial_stop_string_is_held_back_then_released(llama: tuple[Path, Any]) -> None:
    _, ref_text = _reference(llama[0], 12)
    # The text ends with the first three characters of this stop string, which never completes
    # (the model's bytes are ASCII): those characters are held back until generation ends.
    stop = ref_text[-3:] + "é"
    outs = _stream(
        _engine(llama[0]),
        [PROMPT],
        SamplingParams(max_tokens=12, temperature=0, stop=stop, ignore_eos=True),
    )["r0"]
    assert outs[-1].finish_reason == "length" and outs[-1].stop_reason is None
    assert _check_stream(outs) == ref_text
    assert len(outs[-2].text) <= len(ref_text) - 3


def test_stop_token_ids_end_generation(llama: tuple[Path, Any]) -> None:
    ref_ids, _ = _reference(llama[0])
    tok = ref_ids[6]
    first = ref_ids.index(tok)
    out = _engine(llama[0]).generate(
        [PROMPT],
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[tok], ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert out.token_ids == ref_ids[: first + 1]
    assert out.text == ByteTokenizer().decode(ref_ids[:first])  # the stop token is not shown


def test_min_tokens_holds_off_stop_tokens_and_stop_strings(llama: tuple[Path, Any]) -> None:
    ref_ids, ref_text = _reference(llama[0])
    first = ref_ids.index(ref_ids[2])  # where greedy decoding first emits that token
    tok, m = ref_ids[first], first + 4
    engine = _engine(llama[0])
    base: dict[str, Any] = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = engine.generate([PROMPT], SamplingParams(stop_token_ids=[tok], **base), False)[0]
    assert plain.token_ids == ref_ids[: first + 1] and plain.finish_reason == "stop"
    held = engine.generate(
        [PROMPT], SamplingParams(stop_token_ids=[tok], min_tokens=m, logprobs=2, **base), False
    )[0]
    assert len(held.token_ids) >= m and tok not in held.token_ids[:m]
    assert held.token_ids[:first] == ref_ids[:first]
    # At the suppressed position the raw distribution still prefers the stop token; the
    # engine took the best token among the others.
    assert held.logprobs is not None
    ranked = sorted(held.logprobs[first], key=held.logprobs[first].__getitem__, reverse=True)
    assert ranked[0] == tok and held.token_ids[first] == ranked[1]
    # A stop string completed before min_tokens does not end generation.
    stop = ref_text[first]
    early = engine.generate([PROMPT], SamplingParams(stop=stop, **base), False)[0]
    assert early.finish_reason == "stop" and len(early.token_ids) == first + 1
    late = engine.generate([PROMPT], SamplingParams(stop=stop, min_tokens=m, **base), False)[0]
    assert len(late.token_ids) >= m and late.token_ids[:m] == ref_ids[:m]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_skip_special_tokens_false_shows_them() -> None:
    eos = ByteTokenizer.EOS
    for skip, text in ((True, "ab"), (False, "a<|endoftext|>b")):
        det = IncrementalDetokenizer(ByteTokenizer(), [], skip_special_tokens=skip)
        shown = "".join(det.append(t) for t in (ord("a"), eos, ord("b"))) + det.flush()
        assert shown == det.text == text


def test_stop_checker_helpers() -> None:
    assert find_stop("abcSTOPdef", ["STOP"], 5) == (3, 7)
    assert find_stop("abcSTOPdef", ["STOP"], 8) is None  # already checked before
    assert find_stop("xxAByy", ["ABy", "B"], 4) == (2, 5)  # earliest start wins
    assert partial_stop_len("hello wor", ["world", "o w"]) == 3
    assert partial_stop_len("hello", ["xyz"]) == 0
    assert partial_stop_len("ab", ["abc"]) == 2


# -- streamed text --------------------------------------------------------------------------------

SCRIPTS = {
    "latin": "Héllo wörld, façade naïve",
    "cjk": "你好，世界。日本語のテキスト",  # noqa: RUF001
    "emoji": "ok 😀👍🏽🇫🇷 done",
    "arabic": "مرحبا بالعالم",
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_detokenizer_deltas_equal_one_shot_decode(name: str) -> None:
    tok = ByteTokenizer()
    text = SCRIPTS[name]
    prompt = tok.encode("> " + text[:3])
    ids = tok.encode(text) + [ByteTokenizer.EOS] + tok.encode(" end")
    det = IncrementalDetokenizer(tok, prompt)
    deltas = [det.append(t) for t in ids]
    deltas.append(det.flush())
    assert "".join(deltas) == det.text == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)

    # A stop string made of multi-byte characters, split across many byte tokens.
    stop = text[-4:-1]
    det = IncrementalDetokenizer(tok, prompt, stop=[stop])
    shown = ""
    for t in ids:
        shown += det.append(t)
        assert stop not in shown and det.text == shown
        if det.stopped:
            break
    assert det.stopped and det.stop_string == stop
    assert shown == text[: text.find(stop)]


def test_detokenizer_flushes_an_incomplete_character() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ab😀")[:-2]  # the emoji cut in half
    det = IncrementalDetokenizer(tok, [])
    assert "".join(det.append(t) for t in ids) == "ab"
    assert det.flush() == "\ufffd" and det.text == tok.decode(ids)


def test_engine_text_grows_correctly_across_multibyte_characters(tmp_path: Path) -> None:
    # A random model over the whole byte vocabulary emits arbitrary bytes, including broken
    # UTF-8 sequences; streamed text must still add up to a one-shot decode.
    cfg = {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    engine = LLMEngine(EngineConfig(model=f"dummy:{path}", device="cpu", num_blocks=64))
    tok = engine.tokenizer
    prompts = list(SCRIPTS.values())
    # Low temperature on a random model repeats bytes; 1.0 with top-k keeps variety.
    params = [
        SamplingParams(max_tokens=40, temperature=1.0, seed=i, top_k=200, ignore_eos=True)
        for i in range(len(prompts))
    ]
    streams = _stream(engine, prompts, params)
    multibyte = 0
    for outs in streams.values():
        final = outs[-1]
        assert _check_stream(outs) == final.text
        assert final.text == tok.decode(final.token_ids, skip_special_tokens=True)
        multibyte += sum(1 for c in final.text if ord(c) > 127 and c != "\ufffd")
    assert multibyte > 0  # some characters really were assembled from several tokens


# -- logprobs -------------------------------------------------------------------------------------


def _hf_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_logprobs_match_transformers(llama: tuple[Path, Any]) -> None:
    path, hf = llama
    engine = _engine(path, max_num_batched_tokens=5)  # chunked prefill
    params = [
        SamplingParams(max_tokens=8, temperature=0, logprobs=4, ignore_eos=True),
        SamplingParams(
            max_tokens=8,
            temperature=1.0,
            seed=5,
            logprobs=2,
            ignore_eos=True,
            repetition_penalty=1.3,
            top_k=20,
        ),
        SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3, ignore_eos=True),
    ]
    # The third prompt was seen before: a request for prompt logprobs must still compute every
    # prompt position instead of reusing the cached blocks.
    engine.generate([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]], SamplingParams(max_tokens=1), use_tqdm=False)
    prompts = [PROMPT, PROMPT[:5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
    outs = engine.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs[:2], params[:2], strict=True):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        ref = _hf_logprobs(hf, out.prompt_token_ids + out.token_ids)
        start = len(out.prompt_token_ids) - 1
        total = 0.0
        for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            row = ref[start + i]
            assert next(iter(entry)) == tok
            top = row.topk(int(p.logprobs or 0)).indices.tolist()
            assert set(entry) == {tok, *top}
            for t, lp in entry.items():
                assert lp == pytest.approx(float(row[t]), abs=1e-4)
            total += entry[tok]
        assert out.cumulative_logprob == pytest.approx(total)
    assert outs[2].logprobs is None and outs[2].cumulative_logprob is None
    assert outs[2].num_cached_tokens == 0

    prompt_lp = outs[2].prompt_logprobs
    prompt = outs[2].prompt_token_ids
    assert prompt_lp is not None and len(prompt_lp) == len(prompt) and prompt_lp[0] is None
    ref = _hf_logprobs(hf, prompt)
    for j in range(1, len(prompt)):
        p_entry = prompt_lp[j]
        assert p_entry is not None and next(iter(p_entry)) == prompt[j]
        assert set(p_entry) == {prompt[j], *ref[j - 1].topk(3).indices.tolist()}
        for t, lp in p_entry.items():
            assert lp == pytest.approx(float(ref[j - 1, t]), abs=1e-4)


def test_prompt_logprobs_survive_preemption(llama: tuple[Path, Any]) -> None:
    path, hf = llama
    prompts = [[(7 * i + j) % 128 for j in range(18)] for i in range(4)]
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=1, ignore_eos=True)
    engine = _engine(path, num_blocks=14, max_num_batched_tokens=8, enable_prefix_caching=False)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert engine.stats().num_preemptions > 0
    for out in outs:
        lp = out.prompt_logprobs
        assert lp is not None and len(lp) == len(out.prompt_token_ids)
        ref = _hf_logprobs(hf, out.prompt_token_ids)
        for j in range(1, len(lp)):
            entry = lp[j]
            assert entry is not None
            tok = out.prompt_token_ids[j]
            assert entry[tok] == pytest.approx(float(ref[j - 1, tok]), abs=1e-4)


def test_score_yields_every_position_once(llama: tuple[Path, Any]) -> None:
    path, hf = llama
    engine = _engine(path, max_num_batched_tokens=6, enable_prefix_caching=False)
    prompt = [(5 * j + 3) % 128 for j in range(20)]
    engine.add_request("bystander", [1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))
    chunks = list(engine.score(prompt))
    assert len(chunks) > 2  # prefilled in chunks, sharing steps with the other request
    assert [s for s, _ in chunks] == [0] + [s + len(lg) for s, lg in chunks[:-1]]
    logits = torch.cat([lg for _, lg in chunks])
    assert logits.shape == (len(prompt) - 1, 128)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, :-1].float()
    assert torch.allclose(logits, ref, atol=1e-4)
    assert engine.has_unfinished()  # the other request keeps going
    with pytest.raises(ValueError, match="empty"):
        next(iter(engine.score([])))
    engine.abort("bystander")
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().num_blocks_used == 0


def test_top_k_1_and_tiny_top_p_equal_greedy_in_the_engine(llama: tuple[Path, Any]) -> None:
    ref_ids, _ = _reference(llama[0], 12)
    engine = _engine(llama[0])
    params = [
        SamplingParams(max_tokens=12, temperature=1.3, top_k=1, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=1e-6, ignore_eos=True),
        SamplingParams(
            max_tokens=12, temperature=1.0, top_k=1, top_p=0.5, min_p=0.5, ignore_eos=True
        ),
    ]
    outs = engine.generate([PROMPT] * 3, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [ref_ids] * 3
