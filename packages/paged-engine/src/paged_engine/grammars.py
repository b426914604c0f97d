"""Structured-output matchers: compiled grammars per engine, one matcher per request, one token
bitmask per step (xgrammar does the automata; this module does the bookkeeping)."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import xgrammar as xgr

from .structured_output import StructuredOutput
from .tokenizer import ByteTokenizer, Tokenizer

__all__ = ["GrammarCache", "apply_grammar_bitmask", "bounded_strings_as_patterns", "new_matcher"]


class GrammarCache:
    """Compiled grammars for one engine's tokenizer, keyed by ``StructuredOutput.key``.

    ``submit`` returns a future at once; compilation runs on one background thread, so the
    engine step never waits for it (the request waits in the queue instead). Equal constraints
    share one compilation; the ``max_entries`` most recently submitted stay cached. A constraint
    that does not compile fails its future with ValueError carrying xgrammar's message.
    Thread-safe: a server may compile (and so validate) a constraint before queueing it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        max_entries: int = 512,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_entries = max_entries
        self._tokenizer = tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use, on the pool
        self._bitmask: torch.Tensor | None = None

    def submit(self, constraint: StructuredOutput) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of ``constraint``, now or later."""
        key = constraint.key
        with self._lock:
            future = self._entries.get(key)
            if future is not None and not future.cancelled():
                self._entries.move_to_end(key)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
            future = self._pool.submit(self._compile, constraint)
            self._entries[key] = future
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return future

    def close(self) -> None:
        """Stop the compile thread (pending compilations are cancelled)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _compile(self, constraint: StructuredOutput) -> xgr.CompiledGrammar:
        if self._compiler is None:  # only the pool's one thread gets here
            info = tokenizer_info(self._tokenizer, self.vocab_size, self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        compiler = self._compiler
        kind, spec = constraint.kind, constraint.spec
        try:
            if kind == "json_schema":
                schema = bounded_strings_as_patterns(json.loads(spec))
                return compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=False, strict_mode=True
                )
            if kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(s, ensure_ascii=False) for s in spec)
                return compiler.compile_grammar(f"root ::= {alternatives}")
            return compiler.compile_grammar(spec)
        except Exception as exc:  # xgrammar raises RuntimeError / its own errors
            lines = str(exc).strip().splitlines()
            # Drop xgrammar's "[time] file.cc:line: " prefix: the reason is what helps.
            reason = _SOURCE_PREFIX.sub("", lines[0]) if lines else repr(exc)
            raise ValueError(f"the {kind} constraint does not compile: {reason}") from None

    def bitmask(self, rows: int) -> torch.Tensor:
        """A reusable CPU bitmask with at least ``rows`` rows (contents undefined)."""
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = xgr.allocate_token_bitmask(max(rows, 8), self.vocab_size)
        return self._bitmask


_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
# One JSON string character, unescaped: printable ASCII but quote and backslash, or a
# non-ASCII code point other than a surrogate. One range per class: xgrammar merges the
# ranges of a multi-range class loosely and then admits overlong UTF-8 forms.
_PLAIN_CHAR = (
    r"([ !#-\[\]-~]|[\u0080-\u07ff]|[\u0800-\u0fff]|[\u1000-\ud7ff]|[\ue000-\uffff]"
    r"|[\u{10000}-\u{10ffff}])"
)


def bounded_strings_as_patterns(schema: Any) -> Any:
    """A copy of ``schema`` where strings with ``minLength`` / ``maxLength`` (and no pattern or
    format) carry the same bounds as a pattern instead: xgrammar's length-bounded string rule
    admits raw control characters (which JSON forbids) and invalid UTF-8 (which decodes to
    more characters than were counted); its pattern rule with this class admits neither."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings_as_patterns(v) for k, v in schema.items()}
    lo, hi = out.get("minLength"), out.get("maxLength")
    bounded = isinstance(lo, int) or isinstance(hi, int)
    if bounded and out.get("type") == "string" and "pattern" not in out and "format" not in out:
        low = lo if isinstance(lo, int) else 0
        high = str(hi) if isinstance(hi, int) else ""
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHAR}{{{low},{high}}}$"
    return out


def tokenizer_info(
    tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]
) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: the bytes each token id produces."""
    if isinstance(tokenizer, ByteTokenizer):
        # Empty entries are special tokens: never generated as text.
        vocab = [bytes([i]) for i in range(256)] + [b""] * (len(tokenizer) - 256)
        return xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
    hf: Any = tokenizer
    return xgr.TokenizerInfo.from_huggingface(
        hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
    )


def new_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    """A fresh matcher for one request (it tracks that request's generated tokens)."""
    return xgr.GrammarMatcher(compiled)


def apply_grammar_bitmask(
    logits: torch.Tensor,
    rows: Sequence[tuple[int, xgr.GrammarMatcher]],
    cache: GrammarCache,
) -> list[int]:
    """Mask float32 ``logits`` ``[B, V]`` in place: for each ``(row, matcher)``, tokens the matcher
    does not allow next become ``-inf``. Returns the rows whose matcher allows no token at all (a
    dead end); those rows are left unmasked and must not be advanced.

    The bits are unpacked with a few tensor operations over the constrained rows only (on the
    CPU about 5x faster than xgrammar's own CPU kernel at a 49k vocabulary)."""
    if not rows:
        return []
    bitmask = cache.bitmask(logits.shape[0])
    for row, matcher in rows:
        matcher.fill_next_token_bitmask(bitmask, row)
    indices = [row for row, _ in rows]
    words = bitmask[indices]  # [R, ceil(V / 32)] int32, a copy
    alive = words.ne(0).any(dim=1)
    dead = [row for row, ok in zip(indices, alive.tolist(), strict=True) if not ok]
    if dead:
        words[~alive] = -1  # all bits set: allow everything, the caller finishes these rows
    # The runner's logits are inference tensors: update them in inference mode.
    with torch.inference_mode():
        words = words.to(logits.device)
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        vocab = logits.shape[1]
        banned = ((words.unsqueeze(-1) >> shifts) & 1).view(len(indices), -1)[:, :vocab] == 0
        if indices == list(range(logits.shape[0])):
            logits.masked_fill_(banned, float("-inf"))
        else:
            at = torch.tensor(indices, device=logits.device)
            picked = logits.index_select(0, at).masked_fill_(banned, float("-inf"))
            logits.index_copy_(0, at, picked)
    return dead
