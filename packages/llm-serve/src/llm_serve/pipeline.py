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
from paged_engine.tokenizer import Tokenizer

__all__ = ["GenerationConfig", "Pipeline", "Prompt", "Response", "pipeline"]

# LMDeploy's name for the sampling parameters: the same class.
GenerationConfig = SamplingParams

Prompt = str | list[int]
Message = Mapping[str, Any]


@dataclass
class Response:
    """A generation result (or, from ``stream_infer``, one delta of it).

    ``text``: the generated text (a delta: the new text only); ``input_token_len``: prompt tokens;
    ``generate_token_len``: tokens generated so far; ``cached_tokens``: prompt tokens whose KV
    came from the prefix cache; ``finish_reason``: ``stop`` / ``length`` (None in a delta that
    is not the last); ``token_ids``: the generated ids (a delta: the new ones); ``index``: the
    prompt's position in the batch.
    """

    text: str
    input_token_len: int
    generate_token_len: int
    cached_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    index: int = 0


def _is_token_ids(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> tuple[bool, list[Prompt]]:
    """(whether ``prompts`` is a single prompt, the prompts as a list)."""
    if isinstance(prompts, str) or _is_token_ids(prompts):
        return True, [cast(Prompt, prompts)]
    return False, list(cast(Sequence[Prompt], prompts))


def _is_conversation(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) for m in value)


class Pipeline:
    """An engine and a friendly front: ``pipe(prompts)``, ``stream_infer``, ``chat``.

    Prompts are strings or token-id lists; a list of them is a batch (answered in order).
    ``gen_config`` is one ``GenerationConfig`` for all prompts or one per prompt (default:
    ``GenerationConfig()``). Invalid prompts (empty, too long for the model) raise
    ``ValueError``. Not thread-safe; ``close()`` (or leaving a ``with`` block) frees the engine.
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
    def __call__(
        self, prompts: str, gen_config: SamplingParams | Sequence[SamplingParams] | None = ...
    ) -> Response: ...

    @overload
    def __call__(
        self,
        prompts: list[int] | Sequence[Prompt],
        gen_config: SamplingParams | Sequence[SamplingParams] | None = ...,
    ) -> Response | list[Response]: ...

    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Response | list[Response]:
        """Generate for one prompt (returns a ``Response``) or a batch (a list, in order).
        A single token-id list is one prompt."""
        single, batch = _as_batch(prompts)
        results = self._generate(batch, gen_config)
        return results[0] if single else results

    def _generate(
        self, batch: list[Prompt], gen_config: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[Response]:
        finals: dict[int, Response] = {}
        for delta, final in self._run(batch, gen_config):
            if final is not None:
                finals[delta.index] = _final_response(final, delta.index)
        return [finals[i] for i in range(len(batch))]

    def stream_infer(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: SamplingParams | Sequence[SamplingParams] | None = None,
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
        gen_config: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Response | list[Response]:
        """Answer a conversation (a list of ``{"role", "content"}`` messages, or a string taken
        as one user message) with the model's chat template; a list of conversations is a
        batch and returns a list."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        items = list(messages)
        if items and all(_is_conversation(c) for c in items):
            prompts: list[Prompt] = [self.engine.chat_prompt(c) for c in items]  # type: ignore[arg-type]
            return self._generate(prompts, gen_config)
        return self(self.engine.chat_prompt(items), gen_config)  # type: ignore[arg-type]

    def _run(
        self,
        batch: list[Prompt],
        gen_config: SamplingParams | Sequence[SamplingParams] | None,
    ) -> Iterator[tuple[Response, RequestOutput | None]]:
        engine = self.engine
        if gen_config is None or isinstance(gen_config, SamplingParams):
            params = [gen_config if gen_config is not None else SamplingParams()] * len(batch)
        else:
            params = list(gen_config)
            if len(params) != len(batch):
                raise ValueError(
                    f"got {len(params)} generation configs for {len(batch)} prompts; pass one "
                    f"for all or one per prompt"
                )
        ids = {f"pipeline-{next(self._ids)}": i for i in range(len(batch))}
        for (rid, i), p in zip(ids.items(), params, strict=True):
            engine.add_request(rid, batch[i], p)
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
                    text = out.text[seen_text[rid] :]
                    toks = out.token_ids[seen_tokens[rid] :]
                    seen_text[rid], seen_tokens[rid] = len(out.text), len(out.token_ids)
                    if out.finished:
                        pending.discard(rid)
                    elif not text and not toks:
                        continue
                    delta = Response(
                        text=text,
                        input_token_len=len(out.prompt_token_ids),
                        generate_token_len=len(out.token_ids),
                        cached_tokens=out.num_cached_tokens,
                        finish_reason=out.finish_reason if out.finished else None,
                        token_ids=list(toks),
                        index=ids[rid],
                    )
                    yield delta, (out if out.finished else None)
        finally:
            if pending:
                for rid in pending:
                    engine.abort(rid)
                while engine.has_unfinished():  # flush the aborts' final outputs
                    engine.step()

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the engine (its weights and KV cache). Idempotent."""
        if self._engine is not None:
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


def _final_response(out: RequestOutput, index: int) -> Response:
    return Response(
        text=out.text,
        input_token_len=len(out.prompt_token_ids),
        generate_token_len=len(out.token_ids),
        cached_tokens=out.num_cached_tokens,
        finish_reason=out.finish_reason,
        token_ids=list(out.token_ids),
        index=index,
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
