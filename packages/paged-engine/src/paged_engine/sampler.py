"""Turns a step's logits into next tokens, batched over the sequences that sample this step."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

__all__ = [
    "Sampler",
    "SamplerOutput",
    "apply_penalties",
    "filter_logits",
    "stream_seed",
    "top_logprobs",
]


@dataclass
class SamplerOutput:
    """One entry per row: the chosen token, and (for rows that asked for ``logprobs``) a dict
    token id -> log-probability holding the chosen token first, then the ``logprobs`` most
    likely tokens in descending order (the chosen one is not repeated); None otherwise."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Greedy and random sampling over ``[B, V]`` logits, every step in one batch.

    The order, each stage a few tensor operations over all rows that need it:

    1. penalties (rows with any): repetition (prompt and output tokens), frequency and presence
       (output tokens), as ``SamplingParams`` defines them; see :func:`apply_penalties`;
    2. greedy rows (temperature 0): argmax of the penalized logits;
    3. random rows: divide by the temperature, apply min-p, then top-k, then top-p (see
       :func:`filter_logits`), and draw from the softmax of what remains.

    Drawing uses the exponential race (argmax of ``p / E`` with ``E ~ Exp(1)``), which draws
    exactly from ``p``. A request with a seed owns a generator seeded with it, so its noise, and
    its tokens, do not depend on what else is in the batch or on preemption (noise is drawn once
    per sampled token, over the whole vocabulary). Requests without a seed share the engine's
    generator (seeded from ``EngineConfig.seed``). Greedy rows draw no noise. Per-row Python work
    is limited to building the parameter tensors and drawing each seeded row's noise.

    Log-probabilities (rows with ``logprobs`` set) come from the log-softmax of the *raw*
    logits, before penalties, temperature and filters (vLLM's default), so they describe the
    model, not the sampling settings.
    """

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def request_generator(self, params: SamplingParams) -> torch.Generator | None:
        """The private generator for a seeded, non-greedy request (None otherwise)."""
        if params.seed is None or params.greedy:
            return None
        return torch.Generator(device=self.device).manual_seed(stream_seed(params.seed))

    def __call__(
        self,
        logits: torch.Tensor,
        params: Seq[SamplingParams],
        generators: Seq[torch.Generator | None],
        prompt_token_ids: Seq[Seq[int]] | None = None,
        output_token_ids: Seq[Seq[int]] | None = None,
        suppressed: Seq[Seq[int]] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of ``logits`` ``[B, V]``.

        ``prompt_token_ids`` / ``output_token_ids`` (one list per row) are needed only when some
        row has penalties; ``suppressed[i]`` are token ids row i must not pick (``min_tokens``);
        ``logits`` is not modified.
        """
        raw = logits.float()
        work = raw
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            if prompt_token_ids is None or output_token_ids is None:
                raise ValueError("penalties need prompt_token_ids and output_token_ids")
            rows = torch.tensor(pen_rows, device=raw.device)
            penalized = apply_penalties(
                raw.index_select(0, rows),
                [prompt_token_ids[i] for i in pen_rows],
                [output_token_ids[i] for i in pen_rows],
                _column(params, pen_rows, "repetition_penalty", raw.device),
                _column(params, pen_rows, "presence_penalty", raw.device),
                _column(params, pen_rows, "frequency_penalty", raw.device),
            )
            work = raw.index_copy(0, rows, penalized)
        if suppressed is not None and any(suppressed):
            work = work.clone()
            for i, ids in enumerate(suppressed):
                ids = [t for t in ids if t < work.shape[1]]
                work[i, ids] = float("-inf")
        out = work.argmax(dim=-1)

        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            out = out.clone()
            rows = torch.tensor(random_rows, device=raw.device)
            temps = _column(params, random_rows, "temperature", raw.device)
            scaled = work.index_select(0, rows) / temps[:, None]
            vocab = scaled.shape[1]
            top_k = torch.tensor(
                [min(params[i].top_k, vocab) if params[i].top_k > 0 else vocab for i in random_rows],
                device=raw.device,
            )
            scaled = filter_logits(
                scaled,
                top_k,
                _column(params, random_rows, "top_p", raw.device),
                _column(params, random_rows, "min_p", raw.device),
            )
            probs = torch.softmax(scaled, dim=-1)
            noise = self._noise(probs, [generators[i] for i in random_rows])
            out[rows] = (probs / noise).argmax(dim=-1)

        token_ids = [int(t) for t in out.tolist()]
        want = [p.logprobs for p in params]
        logprobs: list[dict[int, float] | None] = [None] * len(params)
        lp_rows = [i for i, n in enumerate(want) if n is not None]
        if lp_rows:
            rows = torch.tensor(lp_rows, device=raw.device)
            entries = top_logprobs(
                raw.index_select(0, rows),
                out.index_select(0, rows),
                [int(want[i] or 0) for i in lp_rows],
            )
            for i, entry in zip(lp_rows, entries, strict=True):
                logprobs[i] = entry
        return SamplerOutput(token_ids, logprobs)

    def _noise(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """``Exp(1)`` noise shaped like ``probs``: seeded rows from their own generator, the
        rest from the engine's, in one draw."""
        noise = torch.empty_like(probs)
        shared = [j for j, g in enumerate(generators) if g is None]
        if shared:
            draw = torch.empty((len(shared), probs.shape[1]), device=probs.device)
            draw.exponential_(generator=self._generator)
            noise[torch.tensor(shared, device=probs.device)] = draw
        for j, g in enumerate(generators):
            if g is not None:
                noise[j].exponential_(generator=g)
        return noise


def stream_seed(seed: int) -> int:
    """The generator seed for a request's ``seed`` (any int in [-2**63, 2**64)).

    torch's CPU generator keeps only the low 32 bits of its seed, so seeds equal mod 2**32 would
    share a stream; a 64-bit mix (splitmix64's finalizer) folds every bit into the low ones."""
    z = seed % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def _column(
    params: Seq[SamplingParams], rows: list[int], name: str, device: torch.device
) -> torch.Tensor:
    return torch.tensor(
        [float(getattr(params[i], name)) for i in rows], device=device, dtype=torch.float32
    )


def _counts(token_lists: Seq[Seq[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[R, V]`` float32 occurrence counts of each row's token ids (one scatter for all)."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros((len(token_lists), vocab + 1), dtype=torch.float32, device=device)
    if width:
        # Pad with an extra bin (vocab) that is dropped afterwards.
        padded = torch.tensor(
            [list(t) + [vocab] * (width - len(t)) for t in token_lists], device=device
        )
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Seq[Seq[int]],
    output_token_ids: Seq[Seq[int]],
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Penalized copy of ``logits`` ``[R, V]`` (penalties are ``[R]`` tensors), as vLLM does:

    - every token in the row's prompt or output: ``l / r`` if ``l > 0`` else ``l * r``;
    - then ``l - frequency * count - presence * (count > 0)``, with ``count`` the token's
      occurrences in the output only.
    """
    vocab = logits.shape[1]
    out_counts = _counts(output_token_ids, vocab, logits.device)
    seen = (out_counts > 0) | (_counts(prompt_token_ids, vocab, logits.device) > 0)
    rep = repetition_penalty[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(seen, penalized, logits)
    return (
        out
        - frequency_penalty[:, None] * out_counts
        - presence_penalty[:, None] * (out_counts > 0).float()
    )


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Copy of temperature-scaled ``logits`` ``[R, V]`` with the dropped tokens at ``-inf``.

    Per row, in order: min-p drops tokens with probability below ``min_p`` times the largest;
    top-k keeps the ``top_k`` largest (``top_k >= V`` keeps all); top-p keeps the most likely
    tokens until their probability, renormalized after top-k, reaches ``top_p`` (the token that
    crosses it is kept, and so is the most likely; ``top_p >= 1`` keeps all). Ties at a cut are
    broken by the sort's order. Rows whose settings are all off are returned unchanged.
    """
    out = logits
    if bool((min_p > 0).any()):
        probs = torch.softmax(out, dim=-1)
        limit = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        out = out.masked_fill(probs < limit, float("-inf"))
    vocab = out.shape[1]
    use_k = bool((top_k < vocab).any())
    use_p = bool((top_p < 1).any())
    if not (use_k or use_p):
        return out
    ordered, order = out.sort(dim=-1, descending=True)
    if use_k:
        ranks = torch.arange(vocab, device=out.device)
        ordered = ordered.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    if use_p:
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        # top_p = 1 never drops (rounding could push ``before`` past 1).
        limit = torch.where(top_p < 1, top_p, torch.full_like(top_p, float("inf")))
        drop = before >= limit[:, None]
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(out, float("-inf")).scatter(1, order, ordered)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: Seq[int]) -> list[dict[int, float]]:
    """Per row ``r`` of raw ``logits`` ``[R, V]``: ``{chosen: logprob, then the n[r] most likely
    tokens in descending order}`` from ``log_softmax(logits)``; the chosen token is listed once,
    so a row has ``n[r]`` entries when it is among the top ``n[r]`` and ``n[r] + 1`` otherwise.
    One ``topk`` serves all rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None].to(torch.int64))[:, 0].tolist()
    most = min(max(n, default=0), logprobs.shape[1])
    top_v: list[list[float]] = [[] for _ in n]
    top_i: list[list[int]] = [[] for _ in n]
    if most > 0:
        values, ids = logprobs.topk(most, dim=-1)
        top_v, top_i = values.tolist(), ids.tolist()
    result: list[dict[int, float]] = []
    for c, lp, k, vs, ts in zip(chosen.tolist(), chosen_lp, n, top_v, top_i, strict=True):
        entry = {int(c): float(lp)}
        for t, v in zip(ts[:k], vs[:k], strict=True):
            entry.setdefault(int(t), float(v))
        result.append(entry)
    return result
