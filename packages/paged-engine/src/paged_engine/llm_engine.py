"""The engine: requests in, tokens out, one scheduled forward pass per step."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from concurrent import futures
from typing import Any

import torch

import kvquant
from prefix_index import EventSubscriber, PrefixIndex

from .block_pool import BlockPool
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .disk_store import DiskBlockStore
from .disk_tier import DiskTier, kv_format
from .grammars import GrammarCache, apply_grammar_bitmask, new_matcher
from .kv_residual import ResidualSlots
from .model_loader import LoadedModel, load_model, resolve_model
from .model_runner import ModelRunner, StepLogits
from .outputs import EngineStats, FinishReason, RequestOutput
from .sampler import Sampler, top_logprobs
from .sampling_params import ParamError, SamplingParams
from .scheduler import ScheduledSequence, Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer

__all__ = [
    "MAX_CONSECUTIVE_FORWARD_FAILURES",
    "EngineFailedError",
    "LLMEngine",
    "Prompt",
    "PromptTooLongError",
    "as_batch",
]

Prompt = str | list[int]

logger = logging.getLogger(__name__)

# After this many failed forward passes in a row the engine gives up (a broken device or model,
# not one bad request) and ``step`` raises ``EngineFailedError``.
MAX_CONSECUTIVE_FORWARD_FAILURES = 3


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a generated token, or can never fit the KV pool."""


class EngineFailedError(RuntimeError):
    """The engine cannot make progress (its forward pass keeps failing); restart it."""


class LLMEngine:
    """A paged-KV LLM engine with continuous batching.

    Offline: ``generate(prompts, params)``. Online: ``add_request`` / ``step`` / ``abort``,
    with ``has_unfinished`` and ``stats``. Each ``step`` schedules decode tokens and prefill
    chunks (scheduler), runs them as one flattened batch (model runner), samples (sampler) and
    post-processes (stop checks, outputs, freeing blocks).

    A request that is invalid (empty prompt, token ids outside the vocabulary, bad sampling
    parameters) or can never fit (prompt not shorter than ``max_model_len`` or than the KV
    pool) is not raised: it finishes with ``finish_reason="error"`` and a message in
    ``error``, reported by the next ``step``; other requests are unaffected. Not thread-safe:
    call it from one thread.
    """

    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        config = config if config is not None else EngineConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        source = resolve_model(config.model, config.revision)
        self.max_model_len = config.resolved_max_model_len(source.config.max_len)
        # The weight format that runs (None: as loaded); see EngineConfig.weight_quant.
        self.weight_quant = config.resolved_weight_quant(source.native_4bit)
        self.loaded: LoadedModel = load_model(
            source, self.device, self.dtype, self.max_model_len, config.seed, self.weight_quant
        )
        self.model_config = self.loaded.config
        self.tokenizer: Tokenizer = self.loaded.tokenizer
        self.eos_token_ids = self.loaded.eos_token_ids

        mc = self.model_config
        layout = config.kv_cache_layout()
        # Block-channel int4 keys: one exact residual block per sequence that may run at once.
        residual_slots = config.resolved_max_batch_size() if layout == "block-channel" else 0
        if config.num_blocks is not None:
            self.kv_cache = kvquant.KVCache(
                num_layers=mc.num_layers,
                num_blocks=config.num_blocks,
                block_size=config.block_size,
                num_kv_heads=mc.num_kv_heads,
                head_dim=mc.head_dim,
                bits=config.quant_policy,
                dtype=self.dtype,
                device=self.device,
                int4_layout=layout,
                residual_slots=residual_slots,
            )
        else:
            # Measured after the weights are loaded; raises ValueError with the bytes one block
            # needs when the budget holds none.
            self.kv_cache = kvquant.KVCache.from_memory_budget(
                budget_bytes=config.kv_budget_bytes(self.device),
                num_layers=mc.num_layers,
                block_size=config.block_size,
                num_kv_heads=mc.num_kv_heads,
                head_dim=mc.head_dim,
                bits=config.quant_policy,
                dtype=self.dtype,
                device=self.device,
                int4_layout=layout,
                residual_slots=residual_slots,
            )
        num_blocks = int(self.kv_cache.num_blocks)
        self.residuals = ResidualSlots(self.kv_cache) if self.kv_cache.block_channel else None
        index = (
            PrefixIndex(config.block_size, policy=config.eviction_policy, ttl=config.cache_ttl)
            if config.enable_prefix_caching
            else None
        )
        self.block_pool = BlockPool(num_blocks, config.block_size, index)
        self.disk_tier: DiskTier | None = None
        if config.kv_disk_dir is not None:
            store = DiskBlockStore(
                config.kv_disk_dir,
                # Resolved settings: "auto" means different things on different machines.
                kv_format(
                    self.kv_cache,
                    self.loaded.source,
                    config.replace(weight_quant=self.weight_quant, dtype=self.dtype),
                ),
                size_limit=config.kv_disk_size_limit,
                ttl=config.cache_ttl,
            )
            self.disk_tier = DiskTier(store, self.kv_cache)
            self.block_pool.on_evict = self.disk_tier.spill
        # No sequence may outgrow the pool, so the oldest running one can always make progress.
        self.max_seq_len = min(self.max_model_len, num_blocks * config.block_size)
        self.scheduler = Scheduler(
            self.block_pool,
            config.resolved_max_batch_size(),
            config.resolved_max_num_batched_tokens(),
            config.prefix_match_threshold,
        )
        self.runner = ModelRunner(
            self.loaded.model,
            self.kv_cache,
            config.block_size,
            self.device,
            self.loaded.vocab_limit,
        )
        self.sampler = Sampler(self.device, config.seed)
        # Structured output: compiled grammars (shared by equal constraints) and the requests
        # whose grammar is still compiling; those wait here, outside the scheduler.
        self.grammars = GrammarCache(self.tokenizer, mc.vocab_size, self.eos_token_ids)
        self._compiling: dict[str, tuple[Sequence, futures.Future[Any]]] = {}
        self._requests: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._pending: list[RequestOutput] = []
        # request id -> prompt logits not yet yielded by ``score``
        self._prompt_logit_sinks: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self._ids = itertools.count()
        # Test hook: called as ``fault_hook(stage, request_id)`` at "forward", "sample" and
        # "postprocess" for each request of a step; raising there simulates a fault.
        self.fault_hook: Callable[[str, str], None] | None = None
        self._forward_failures = 0  # consecutive failed forward passes
        self._forward_error = ""
        self._num_finished = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0

    # -- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        cache_salt: bytes = b"",
    ) -> None:
        """Queue a request. Raises ValueError only for a request id already in use or a
        ``cache_salt`` that is not bytes; a bad request is finished with an error output
        returned by the next ``step``.

        ``cache_salt`` is the request's prefix-cache namespace (a tenant): it reuses only
        blocks computed under the same salt."""
        if request_id in self._requests or any(o.request_id == request_id for o in self._pending):
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(cache_salt, bytes):
            raise ValueError(f"cache_salt must be bytes, got {type(cache_salt).__name__}")
        params = params if params is not None else SamplingParams()
        token_ids: list[int] = []
        error: str | None = None
        param: str | None = None
        generator: torch.Generator | None = None
        try:
            if not isinstance(params, SamplingParams):
                raise ValueError(
                    f"sampling params must be SamplingParams, got {type(params).__name__}"
                )
            params.validate()
            token_ids = self.check_prompt(prompt)
            generator = self.sampler.request_generator(params)
        except (ValueError, TypeError, OverflowError) as exc:
            error = str(exc)
            param = exc.param if isinstance(exc, ParamError) else None
        seq = Sequence(
            request_id,
            token_ids,
            params,
            IncrementalDetokenizer(self.tokenizer, token_ids)
            if error is not None
            else IncrementalDetokenizer(
                self.tokenizer,
                token_ids,
                params.stop_strings,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
                params.min_tokens,
            ),
            arrival_time,
            cache_salt,
        )
        if error is not None:
            seq.finish("error", error, error_param=param)
            self._pending.append(seq.to_output())
            self._num_finished += 1
            return
        self._requests[request_id] = seq
        self._generators[request_id] = generator
        self._prompt_tokens += len(token_ids)
        if params.structured_output is not None:
            self._compiling[request_id] = (seq, self.grammars.submit(params.structured_output))
        else:
            self.scheduler.add(seq)

    def check_prompt(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids (a string is tokenized), checked as ``add_request`` would.

        Raises ValueError for a prompt that is not a string or a list of ints, is empty, has ids
        outside the vocabulary, and ``PromptTooLongError`` (a ValueError) for one that leaves no
        room for a generated token (``max_model_len``) or can never fit the KV pool."""
        if isinstance(prompt, str):
            token_ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("a token-id prompt must be a list of ints")
            token_ids = list(prompt)
        else:
            raise ValueError(
                f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        n = len(token_ids)
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt is too long: it has {n} tokens but max_model_len is "
                f"{self.max_model_len}; at most {self.max_model_len - 1} prompt tokens leave "
                f"room for one generated token"
            )
        if n >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt is too long: it has {n} tokens but the KV cache holds only "
                f"{self.max_seq_len} tokens ({self.block_pool.num_blocks} blocks of "
                f"{self.config.block_size}), so it can never fit; raise num_blocks or "
                f"cache_size_limit"
            )
        return token_ids

    def chat_prompt(
        self,
        messages: Seq[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The token ids of ``messages`` (``{"role", "content", ...}`` dicts) under the model's
        chat template: ready for the assistant's reply (``add_generation_prompt``), or leaving
        the last message open for the model to continue (``continue_final_message``).
        ``chat_template_kwargs`` go to the template (e.g. ``enable_thinking``). Raises
        ValueError when the template cannot format the messages."""
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "continue_final_message continues the last message, so add_generation_prompt "
                "must be false with it"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **dict(chat_template_kwargs or {}),
            )
        except Exception as exc:  # templates raise anything (jinja errors, their own checks)
            raise ValueError(
                f"this model's chat template cannot format these messages: {exc}"
            ) from None
        if not isinstance(text, str):
            raise ValueError(f"the chat template returned {type(text).__name__}, not text")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its final output (``abort``) comes with the next
        ``step``. Returns False when the request is unknown or already finished."""
        seq = self._requests.get(request_id)
        if seq is None:
            return False
        self._compiling.pop(request_id, None)
        self._finish(seq, "abort")
        self._pending.append(seq.to_output())
        return True

    def has_unfinished(self) -> bool:
        """True while some request has not yet been reported finished by ``step``."""
        return bool(self._requests or self._pending)

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass. Returns an output for every request that got a token
        or finished (including errors and aborts since the last step).

        Faults are contained: an exception while sampling, detokenizing or checking stops for
        one request finishes that request with ``finish_reason="error"``; an exception in the
        batched forward pass fails that step's requests. Other requests go on. Raises
        ``EngineFailedError`` when ``MAX_CONSECUTIVE_FORWARD_FAILURES`` forward passes fail in
        a row: the engine cannot make progress and should be restarted."""
        outputs, self._pending = self._pending, []
        outputs.extend(self._start_compiled())
        self.block_pool.expire()  # O(expired): idle cached blocks go even without pressure
        self._load_from_disk()  # before scheduling: admission then finds those blocks in memory
        scheduled = self.scheduler.schedule().scheduled
        if self.residuals is not None:  # before the forward pass writes any key
            self.residuals.assign(scheduled, self.scheduler.running)
        if not scheduled:
            self._flush_cache_events()
            if self._compiling and not outputs:
                # Nothing to run until a grammar compiles: wait a little instead of spinning.
                pending = [f for _, f in self._compiling.values()]
                futures.wait(pending, timeout=0.01, return_when=futures.FIRST_COMPLETED)
            return outputs
        logits = self._execute(scheduled)
        if logits is None:
            self._flush_cache_events()
            return outputs + [self._fail(s.seq, self._forward_error) for s in scheduled]
        self._take_prompt_logits(scheduled, logits.prompt)
        sampling = [s.seq for s in scheduled if s.completes]
        constrained = [(i, s.grammar) for i, s in enumerate(sampling) if s.grammar is not None]
        dead = set(apply_grammar_bitmask(logits.sample, constrained, self.grammars))
        sampled = self._sample(sampling, logits.sample)
        self.scheduler.computed(scheduled)
        for row, (seq, result) in enumerate(zip(sampling, sampled, strict=True)):
            outputs.append(self._postprocess(seq, result, allowed=row not in dead))
        self._flush_cache_events()  # the step's cache changes, one batch
        return outputs

    def _load_from_disk(self) -> None:
        """Load stored blocks continuing the cached prefixes of the waiting requests that may
        be admitted now. Best effort: a failure is logged and those blocks get computed."""
        sch = self.scheduler
        if self.disk_tier is None or not sch.waiting:
            return
        room = max(0, sch.max_batch_size - len(sch.running))
        try:
            self.disk_tier.load(self.block_pool, itertools.islice(sch.waiting, room))
        except Exception:
            logger.exception("loading KV blocks from the disk tier failed; computing them")

    def _execute(self, scheduled: list[ScheduledSequence]) -> StepLogits | None:
        """The batched forward pass; None (with ``_forward_error`` set) if it raised."""
        try:
            if self.fault_hook is not None:
                for s in scheduled:
                    self.fault_hook("forward", s.seq.request_id)
            logits = self.runner.execute(scheduled)
        except Exception as exc:
            self._forward_failures += 1
            logger.exception("the forward pass failed for %d requests", len(scheduled))
            self._forward_error = f"internal error in the forward pass: {exc!r}"
            if self._forward_failures >= MAX_CONSECUTIVE_FORWARD_FAILURES:
                raise EngineFailedError(
                    f"{self._forward_failures} forward passes failed in a row; last: {exc!r}"
                ) from exc
            return None
        self._forward_failures = 0
        return logits

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> list[tuple[int, dict[int, float] | None] | BaseException]:
        """One token (and its logprobs) per sequence, batched; if the batch raises, each row is
        sampled alone so that only the rows that fail get their exception back."""
        try:
            return self._sample_rows(seqs, logits)
        except Exception:
            results: list[tuple[int, dict[int, float] | None] | BaseException] = []
            for i, seq in enumerate(seqs):
                try:
                    results.extend(self._sample_rows([seq], logits[i : i + 1]))
                except Exception as exc:
                    logger.exception("sampling failed for request %s", seq.request_id)
                    results.append(exc)
            return results

    def _sample_rows(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> list[tuple[int, dict[int, float] | None] | BaseException]:
        if self.fault_hook is not None:
            for seq in seqs:
                self.fault_hook("sample", seq.request_id)
        out = self.sampler(
            logits,
            [s.params for s in seqs],
            [self._generators.get(s.request_id) for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            [self._suppressed(s) for s in seqs],
        )
        return list(zip(out.token_ids, out.logprobs, strict=True))

    def _postprocess(
        self,
        seq: Sequence,
        sampled: tuple[int, dict[int, float] | None] | BaseException,
        allowed: bool = True,
    ) -> RequestOutput:
        """Append the sampled token, check the stop conditions, finish the request if it is
        done; a failure here (or in sampling) finishes this request with an error. A
        constrained request's matcher advances with the token; ``allowed`` False (its
        constraint left no token) finishes it with an error."""
        if isinstance(sampled, BaseException):
            return self._fail(seq, f"internal error while sampling: {sampled!r}")
        token, logprobs = sampled
        if seq.grammar is not None and (not allowed or not seq.grammar.accept_token(token)):
            return self._reject(
                seq, "the structured-output constraint cannot be satisfied: it allows no next token"
            )
        try:
            if self.fault_hook is not None:
                self.fault_hook("postprocess", seq.request_id)
            stop_token = self._is_stop_token(seq, token)
            # Stop tokens end the request without adding text (as vLLM).
            seq.append_token(
                token, logprobs, detokenize=seq.params.include_stop_str_in_output or not stop_token
            )
            self._generation_tokens += 1
            reason = self._stop_reason(seq, token, stop_token)
            if reason is not None:
                self._finish(seq, reason)
            return seq.to_output()
        except Exception as exc:
            logger.exception("post-processing failed for request %s", seq.request_id)
            return self._fail(seq, f"internal error while post-processing: {exc!r}")

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Free a running request's blocks and mark it finished (an ``error`` here is the
        engine's fault, not the request's)."""
        self.scheduler.finish(seq)
        seq.finish(reason, error, internal_error=error is not None)
        del self._requests[seq.request_id]
        self._generators.pop(seq.request_id, None)
        self._num_finished += 1

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        """Finish a running request with ``finish_reason="error"``; its blocks are freed."""
        self._finish(seq, "error", error)
        return seq.to_output()

    def reset_prefix_cache(self, cache_salt: bytes | None = None) -> int:
        """Drop every cached block nobody is using, of one namespace or (None) all, in memory
        and on disk; returns how many blocks were freed in memory. Blocks of running requests
        stay in memory."""
        if self.disk_tier is not None:
            self.disk_tier.clear(cache_salt)
        freed = self.block_pool.clear_cache(cache_salt)
        self._flush_cache_events()
        return freed

    def subscribe_cache_events(self, subscriber: EventSubscriber | None) -> None:
        """Send the prefix cache's events (``prefix_index.BlockStored`` / ``BlockRemoved`` /
        ``Cleared``) to ``subscriber``: one call per ``step`` (and per ``reset_prefix_cache``)
        that changed the cache, from the thread that steps; the first call starts with
        ``Cleared(None)`` and the blocks cached now. None unsubscribes. Raises ``ValueError``
        when prefix caching is off."""
        self.block_pool.subscribe(subscriber)

    def _flush_cache_events(self) -> None:
        self.block_pool.flush_events()

    def persist_prefix_cache(self, cache_salt: bytes | None = None) -> int:
        """Write every block of the in-memory prefix cache (of one namespace or, None, all) to
        the disk tier and wait until written; returns how many blocks were written (blocks
        already on disk are not). Raises ValueError when the disk tier is off."""
        if self.disk_tier is None:
            raise ValueError("the disk tier is off: set EngineConfig.kv_disk_dir to persist")
        # Children before parents, as eviction spills them: under the disk's size limit a
        # chain then loses its tail first, and its head stays usable.
        blocks = self.block_pool.cached_chain(cache_salt)[::-1]
        n = self.disk_tier.spill(blocks, wait=True)
        self.disk_tier.flush()
        return n

    def close(self) -> None:
        """Shut down gracefully: persist the prefix cache to the disk tier (when on) and stop
        its writer. The engine must not be stepped afterwards. Idempotent."""
        if self.disk_tier is not None:
            self.persist_prefix_cache()
            self.disk_tier.close()
            self.block_pool.on_evict = None
            self.disk_tier = None

    def _take_prompt_logits(
        self, scheduled: list[ScheduledSequence], prompt: dict[int, tuple[int, torch.Tensor]]
    ) -> None:
        """Turn a step's prompt logits into ``prompt_logprobs`` entries and hand them to
        ``score`` callers; positions whose KV came from the prefix cache get None."""
        for i, (start, logits) in prompt.items():
            seq = scheduled[i].seq
            end = start + logits.shape[0]
            if seq.prompt_logprobs is not None:
                seq.prompt_logprobs.extend([None] * (start - seq.num_prompt_logits))
                n = int(seq.params.prompt_logprobs or 0)
                targets = torch.tensor(seq.prompt_token_ids[start + 1 : end + 1])
                seq.prompt_logprobs.extend(
                    top_logprobs(logits, targets.to(logits.device), [n] * len(targets))
                )
            sink = self._prompt_logit_sinks.get(seq.request_id)
            if sink is not None:
                sink.append((start, logits))
            seq.num_prompt_logits = end

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        """Whether ``token``, sampled next for ``seq``, ends it (never before ``min_tokens``),
        or it completed a constraint that allows nothing more."""
        if seq.grammar is not None and seq.grammar.is_terminated():
            return True
        return (
            token in self._stop_token_ids(seq)
            and len(seq.output_token_ids) >= seq.params.min_tokens
        )

    def _stop_token_ids(self, seq: Sequence) -> set[int]:
        p = seq.params
        return set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(self.eos_token_ids))

    def _suppressed(self, seq: Sequence) -> list[int]:
        """Tokens the sampler must not pick for ``seq`` now: its stop tokens until
        ``min_tokens`` tokens are out."""
        if len(seq.output_token_ids) >= seq.params.min_tokens:
            return []
        return sorted(self._stop_token_ids(seq))

    def _reject(self, seq: Sequence, error: str) -> RequestOutput:
        """Finish a request whose constraint cannot go on (its input's fault, not the engine's)."""
        self._finish(seq, "error")
        seq.error, seq.error_param = error, "structured_output"
        return seq.to_output()

    def _start_compiled(self) -> list[RequestOutput]:
        """Queue the requests whose grammar has compiled; finish those whose grammar failed."""
        failed: list[RequestOutput] = []
        for rid, (seq, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[rid]
            exc = future.exception()
            if exc is not None:
                failed.append(self._reject(seq, str(exc)))
                continue
            seq.grammar = new_matcher(future.result())
            self.scheduler.add(seq)
        return failed

    def _stop_reason(self, seq: Sequence, token: int, stop_token: bool) -> FinishReason | None:
        """Why ``seq`` ends after ``token`` (None: it goes on); records ``seq.stop_reason``.
        ``stop_token``: whether ``token`` is an end-of-sequence or stop token."""
        p = seq.params
        if stop_token:
            if token in (p.stop_token_ids or ()):
                seq.stop_reason = token
            return "stop"
        if seq.detokenizer.stopped:
            seq.stop_reason = seq.detokenizer.stop_string
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None

    # -- offline --------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        cache_salt: bytes = b"",
    ) -> list[RequestOutput]:
        """Generate for a prompt or a batch of prompts (strings or token-id lists); returns the
        final outputs in input order. ``sampling_params`` is one object for all or one per
        prompt. Other requests already in the engine keep running alongside, but their outputs
        from the steps run here are not returned."""
        batch = as_batch(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(batch)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(batch):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(batch)} prompts; pass one "
                    f"for all or one per prompt"
                )
        ids = [f"generate-{next(self._ids)}" for _ in batch]
        while any(i in self._requests for i in ids):  # ids a caller chose by hand
            ids = [f"generate-{next(self._ids)}" for _ in batch]
        for rid, prompt, params in zip(ids, batch, params_list, strict=True):
            self.add_request(rid, prompt, params, cache_salt=cache_salt)
        wanted = set(ids)
        results: dict[str, RequestOutput] = {}
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while len(results) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]

    def score(self, prompt: Prompt) -> Iterator[tuple[int, torch.Tensor]]:
        """Teacher-forced logits of every position of ``prompt``, through the paged path.

        The prompt runs as a request that generates one greedy token, scheduled like any other:
        prefilled in chunks of at most ``max_num_batched_tokens`` tokens, each chunk attending
        to the KV cache (quantized under ``quant_policy`` 4 / 8) written by the chunks before.
        Yields ``(start, logits)`` as chunks complete: float32 raw logits ``[m, V]`` of positions
        ``start .. start + m - 1``, where position ``p`` predicts prompt token ``p + 1``; the
        positions ``0 .. len(prompt) - 2`` come once each, in order, even across preemption.
        Positions whose KV the prefix cache supplies are not computed and are skipped (use an
        engine with ``enable_prefix_caching=False`` for complete coverage).

        Other requests keep running alongside, but their outputs from the steps run here are
        dropped. Raises ValueError for a prompt the engine would reject. Closing the iterator
        early aborts the request.
        """
        rid = f"score-{next(self._ids)}"
        while rid in self._requests:
            rid = f"score-{next(self._ids)}"
        self.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        seq = self._requests.get(rid)
        if seq is None:
            out = next(o for o in self._pending if o.request_id == rid)
            self._pending.remove(out)
            raise ValueError(out.error)
        seq.capture_prompt_logits = True
        sink = self._prompt_logit_sinks[rid] = []
        try:
            while rid in self._requests or sink:
                if not sink:
                    self.step()
                while sink:
                    yield sink.pop(0)
        finally:
            self._prompt_logit_sinks.pop(rid, None)
            if self.abort(rid):
                self._pending = [o for o in self._pending if o.request_id != rid]

    # -- introspection --------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        pool = self.block_pool
        return EngineStats(
            num_blocks_total=pool.num_blocks,
            num_blocks_used=pool.num_used,
            num_blocks_free=pool.num_free,
            num_blocks_cached=pool.num_cached,
            kv_usage=pool.num_used / pool.num_blocks,
            prefix_cache_queried_tokens=self.scheduler.num_queried_tokens,
            prefix_cache_hit_tokens=self.scheduler.num_hit_tokens,
            num_evictions=pool.num_evicted,
            num_expirations=pool.num_expired,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._compiling),
            num_preemptions=self.scheduler.num_preemptions,
            num_finished=self._num_finished,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            **(self.disk_tier.engine_stats() if self.disk_tier is not None else {}),
        )

    def check_invariants(self) -> None:
        """Assert block accounting: every block free, cached or owned by a live sequence."""
        live = list(self.scheduler.running) + list(self.scheduler.waiting)
        if {s.request_id for s in live} | set(self._compiling) != set(self._requests):
            raise AssertionError("scheduler queues and the request table disagree")
        self.block_pool.check_invariants(s.block_ids for s in live)


def as_batch(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """One prompt (a string or a list of token ids) as a batch of one; a batch as a list."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]
