"""Streamed text and stop strings with the bundled model's tokenizer (byte-level BPE, where CJK
characters and emoji are split across several tokens)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from paged_engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from paged_engine.detokenizer import IncrementalDetokenizer

SCRIPTS = {
    "latin": "Voilà une façade naïve, über schön.",
    "cjk": "你好，世界。日本語のテキストも大丈夫です。",  # noqa: RUF001
    "emoji": "Party time 😀👍🏽🇫🇷🧑‍🚀 done",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
}
PROMPTS = {
    "latin": "Écris une phrase en français sur la mer:",
    "cjk": "请用中文写一句关于大海的话：",  # noqa: RUF001
    "emoji": "Reply only with emoji 🎉🔥:",
    "arabic": "اكتب جملة عن البحر:",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(device="cpu", num_blocks=256))


def _stream(
    engine: LLMEngine, prompts: list[str], params: list[SamplingParams]
) -> list[list[RequestOutput]]:
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"s{i}", prompt, p)
    seen: list[list[RequestOutput]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for out in engine.step():
            seen[int(out.request_id[1:])].append(out)
    return seen


def _assembled(outs: list[RequestOutput]) -> str:
    text = ""
    for o in outs:
        assert o.text == text + o.delta_text  # text only grows by appending
        text += o.delta_text
    assert outs[-1].finished
    return text


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_detokenizer_deltas_equal_one_shot_decode(engine: LLMEngine, name: str) -> None:
    tok = engine.tokenizer
    ids = tok.encode(SCRIPTS[name])
    prompt = tok.encode(PROMPTS[name])
    det = IncrementalDetokenizer(tok, prompt)
    deltas = [det.append(t) for t in ids]
    deltas.append(det.flush())
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == SCRIPTS[name]
    assert not any("\ufffd" in d for d in deltas)
    if name in ("cjk", "emoji"):
        assert len(ids) > len([d for d in deltas if d])  # some characters took several tokens


def test_streamed_deltas_equal_one_shot_decode(engine: LLMEngine) -> None:
    names = sorted(PROMPTS)
    params = [
        SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=i)
        for i in range(len(names))
    ]
    streams = _stream(engine, [PROMPTS[n] for n in names], params)
    non_ascii = 0
    for outs in streams:
        final = outs[-1]
        text = _assembled(outs)
        assert text == final.text
        assert text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)
        non_ascii += sum(ord(c) > 127 for c in text)
    assert non_ascii > 0


def test_stop_strings_inside_and_across_tokens(engine: LLMEngine) -> None:
    prompt = "The capital of France is"
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = engine.generate(prompt, greedy, use_tqdm=False)[0]
    assert "Paris" in ref.text
    tok = engine.tokenizer
    # Character offsets where each generated token's text ends.
    ends = [
        len(tok.decode(ref.token_ids[: i + 1], skip_special_tokens=True))
        for i in range(len(ref.token_ids))
    ]
    # One stop string inside a single token ("ari" of " Paris"), one spanning three tokens
    # that starts and ends in the middle of tokens.
    a, b = ends[3], ends[5]
    across = ref.text[a - 1 : b + 1] if b + 1 <= len(ref.text) else ref.text[a - 1 : b]
    for stop in ("ari", across):
        params = SamplingParams(max_tokens=24, temperature=0, stop=stop, ignore_eos=True)
        outs = _stream(engine, [prompt], [params])[0]
        final = outs[-1]
        cut = ref.text.find(stop)
        assert final.finish_reason == "stop" and final.stop_reason == stop
        assert _assembled(outs) == final.text == ref.text[:cut]
        assert final.token_ids == ref.token_ids[: len(final.token_ids)]
        # The last token is the one that completes the stop string.
        n = len(final.token_ids)
        assert ends[n - 1] >= cut + len(stop) > (ends[n - 2] if n > 1 else 0)
