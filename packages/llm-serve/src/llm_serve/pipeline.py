"""The offline pipeline API: ``pipeline(model)`` -> a callable over prompts and chats.

Usage::

    from llm_serve import EngineConfig, GenerationConfig, pipeline

    with pipeline("default", backend_config=EngineConfig(quant_policy=8)) as pipe:
        print(pipe("Hello").text)
        for r in pipe(["a", "b"], gen_config=GenerationConfig(max_tokens=32, temperature=0)):
            print(r.text, r.cached_tokens)
        for delta in pipe.stream_infer("Tell me a story"):
            print(delta.text, end="")
        print(pipe.chat([{"role": "user", "content": "Hi!"}]).text)
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast, overload

from paged_engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from paged_engine.config import resolve_aliases
from paged_engine.llm_engine import as_batch
from paged_engine.tokenizer import Tokenizer

__all__ = ["GenerationConfig", "Pipeline", "Prompt", "Response", "pipeline"]

Message = Mapping[str, Any]
Prompt = str | list[int] | Sequence[Message]
GenConfigs = SamplingParams | Sequence[SamplingParams] | None  # one for all prompts, or one each

# LMDeploy's GenerationConfig names -> SamplingParams fields (the README has the whole table).
LMDEPLOY_GENERATION_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "random_seed": "seed",
    "stop_words": "stop",
}


class GenerationConfig(SamplingParams):
    """LMDeploy's ``GenerationConfig``: ``SamplingParams`` with LMDeploy's defaults (greedy,
    512 new tokens) that also takes LMDeploy's names (``LMDEPLOY_GENERATION_NAMES``).
    ``do_sample=False`` means greedy (temperature 0); ``True`` samples at ``temperature``
    (default 1.0). Raises ValueError when two names of one setting disagree."""

    def __init__(self, do_sample: bool | None = None, **kwargs: Any) -> None:
        kwargs = resolve_aliases(kwargs, LMDEPLOY_GENERATION_NAMES, "GenerationConfig")
        t = kwargs.get("temperature")
        if do_sample is not None and isinstance(t, (int, float)) and (t > 0) != do_sample:
            raise ValueError(f"GenerationConfig: do_sample={do_sample} contradicts temperature={t}")
        kwargs.setdefault("temperature", 1.0 if do_sample else 0.0)
        kwargs.setdefault("max_tokens", 512)
        super().__init__(**kwargs)


@dataclass
class Response:
    """A generation result (or, from ``stream_infer``, one delta of it).

    ``text``: the generated text (a delta: the new text only); ``input_token_len``: prompt tokens;
    ``generate_token_len``: tokens generated so far; ``cached_tokens``: prompt tokens whose KV
    came from the prefix cache; ``finish_reason``: ``stop`` / ``length`` (None in a delta that
    is not the last); ``token_ids``: the generated ids (a delta: the new ones); ``index``: the
    prompt's position in the batch; ``logprobs``: per generated token ``{token id: logprob}``
    (the token first, then the top alternatives) when ``gen_config.logprobs`` asked for them.
    """

    text: str
    input_token_len: int
    generate_token_len: int
    cached_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    index: int = 0
    logprobs: list[dict[int, float]] | None = None


def _is_conversation(value: object) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(m, Mapping) for m in value)
    )


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> tuple[bool, list[Prompt]]:
    """(whether ``prompts`` is a single prompt, the prompts as a list)."""
    if _is_conversation(prompts):
        return True, [cast(Prompt, prompts)]
    batch = as_batch(cast(Any, prompts))
    return isinstance(prompts, str) or batch[:1] == [prompts], cast(list[Prompt], batch)


class Pipeline:
    """An engine and a friendly front: ``pipe(prompts)``, ``stream_infer``, ``chat``.

    A prompt is a string, a token-id list or a conversation (a list of ``{"role", "content"}``
    messages, put through the model's chat template); a list of them is a batch (answered in
    order). ``gen_config`` is one ``GenerationConfig`` for all prompts or one per prompt
    (default: ``GenerationConfig()``, LMDeploy's: greedy, 512 new tokens). Invalid prompts
    (empty, too long for the model) raise ``ValueError``. Not thread-safe; ``close()`` (or
    leaving a ``with`` block) frees the engine.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._engine: LLMEngine | None = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        """The underlying engine; raises ``RuntimeError`` after ``close()``."""
        if self._engine is None:
            raise RuntimeError("this pipeline is closed")
        return self._engine

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.engine.tokenizer

    # -- generation -----------------------------------------------------------------------------

    @overload
    def __call__(self, prompts: str, gen_config: GenConfigs = ...) -> Response: ...

    @overload
    def __call__(
        self, prompts: list[int] | Sequence[Prompt], gen_config: GenConfigs = ...
    ) -> Response | list[Response]: ...

    def __call__(
        self, prompts: Prompt | Sequence[Prompt], gen_config: GenConfigs = None
    ) -> Response | list[Response]:
        """Generate for one prompt (returns a ``Response``) or a batch (a list, in order).
        A single token-id list or conversation is one prompt."""
        single, batch = _as_batch(prompts)
        finals: dict[int, Response] = {}
        for delta, final in self._run(batch, gen_config):
            if final is not None:
                finals[delta.index] = _response(final, delta.index, final.text, 0)
        return finals[0] if single else [finals[i] for i in range(len(batch))]

    def stream_infer(
        self, prompts: Prompt | Sequence[Prompt], gen_config: GenConfigs = None
    ) -> Generator[Response, None, None]:
        """Yield deltas as they are generated: ``text`` and ``token_ids`` hold only the new part,
        ``index`` says which prompt of the batch, and a prompt's last delta has its
        ``finish_reason``. Closing the iterator early aborts the unfinished requests."""
        _single, batch = _as_batch(prompts)
        for delta, _final in self._run(batch, gen_config):
            yield delta

    def chat(
        self,
        messages: str | Sequence[Message] | Sequence[Sequence[Message]],
        gen_config: GenConfigs = None,
    ) -> Response | list[Response]:
        """Answer a conversation (a string is one user message); a list of conversations is a
        batch and returns a list. The same as calling the pipeline on them."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self(messages, gen_config)  # type: ignore[arg-type]

    def _run(
        self, batch: list[Prompt], gen_config: GenConfigs
    ) -> Iterator[tuple[Response, RequestOutput | None]]:
        engine = self.engine
        if gen_config is None or isinstance(gen_config, SamplingParams):
            params = [gen_config if gen_config is not None else GenerationConfig()] * len(batch)
        else:
            params = list(gen_config)
            if len(params) != len(batch):
                raise ValueError(
                    f"got {len(params)} generation configs for {len(batch)} prompts; pass one "
                    f"for all or one per prompt"
                )
        ids = {f"pipeline-{next(self._ids)}": i for i in range(len(batch))}
        prompts = [
            engine.chat_prompt(cast(Sequence[Message], p)) if _is_conversation(p) else p
            for p in batch
        ]
        for (rid, i), p in zip(ids.items(), params, strict=True):
            engine.add_request(rid, cast("str | list[int]", prompts[i]), p)
        pending = set(ids)
        seen_text: dict[str, int] = dict.fromkeys(ids, 0)
        seen_tokens: dict[str, int] = dict.fromkeys(ids, 0)
        try:
            while pending:
                for out in engine.step():
                    rid = out.request_id
                    if rid not in pending:
                        continue
                    if out.finish_reason == "error":
                        raise ValueError(f"prompt {ids[rid]}: {out.error}")
                    text, first = out.text[seen_text[rid] :], seen_tokens[rid]
                    seen_text[rid], seen_tokens[rid] = len(out.text), len(out.token_ids)
                    if out.finished:
                        pending.discard(rid)
                    elif not text and len(out.token_ids) == first:
                        continue
                    delta = _response(out, ids[rid], text, first)
                    yield delta, (out if out.finished else None)
        finally:
            if pending:
                for rid in pending:
                    engine.abort(rid)
                while engine.has_unfinished():  # flush the aborts' final outputs
                    engine.step()

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the engine (its weights and KV cache), first writing its prefix cache to the
        disk tier when there is one. Idempotent."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            import gc

            gc.collect()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _response(out: RequestOutput, index: int, text: str, first: int) -> Response:
    """The response for ``out`` from generated token ``first`` on, with ``text``."""
    return Response(
        text=text,
        input_token_len=len(out.prompt_token_ids),
        generate_token_len=len(out.token_ids),
        cached_tokens=out.num_cached_tokens,
        finish_reason=out.finish_reason if out.finished else None,
        token_ids=list(out.token_ids[first:]),
        index=index,
        logprobs=None if out.logprobs is None else list(out.logprobs[first:]),
    )


def pipeline(
    model: str | None = None, backend_config: EngineConfig | None = None, **overrides: Any
) -> Pipeline:
    """Build a ``Pipeline``: ``model`` (a spec such as ``"default"``, a directory, a ``.gguf`` or
    ``"dummy:<preset|config.json>"``) wins over ``backend_config.model``; ``backend_config``
    defaults to ``EngineConfig()``; keyword ``overrides`` replace further ``EngineConfig`` fields.
    Loads the model now (raises what the engine raises for a bad spec or config)."""
    config = backend_config if backend_config is not None else EngineConfig()
    changes: dict[str, Any] = dict(overrides)
    if model is not None:
        changes["model"] = model
    if changes:
        config = config.replace(**changes)
    return Pipeline(config)
