"""Turns a step's logits into next tokens, batched over the sequences that sample this step."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .sampling_params import SamplingParams

__all__ = ["Sampler"]


class Sampler:
    """Greedy and temperature sampling over ``[B, V]`` logits.

    Temperature sampling uses the exponential race (argmax of ``p / E`` with ``E ~ Exp(1)``),
    which draws exactly from ``p``. A request with a seed owns a generator seeded with it, so
    its noise, and its tokens, do not depend on what else is in the batch or on preemption
    (noise is drawn once per sampled token). Requests without a seed share the engine's
    generator (seeded from ``EngineConfig.seed``). Greedy rows draw no noise.
    """

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def request_generator(self, params: SamplingParams) -> torch.Generator | None:
        """The private generator for a seeded, non-greedy request (None otherwise)."""
        if params.seed is None or params.greedy:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Seq[SamplingParams],
        generators: Seq[torch.Generator | None],
    ) -> list[int]:
        """Sample one token per row of ``logits`` (float32 recommended); returns token ids."""
        greedy_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return [int(t) for t in greedy_ids.tolist()]
        rows = torch.tensor(random_rows, device=logits.device)
        temps = torch.tensor(
            [float(params[i].temperature) for i in random_rows],
            device=logits.device,
            dtype=torch.float32,
        )
        probs = torch.softmax(logits.index_select(0, rows).float() / temps[:, None], dim=-1)
        noise = torch.empty_like(probs)
        shared = [j for j, i in enumerate(random_rows) if generators[i] is None]
        if shared:
            draw = torch.empty((len(shared), probs.shape[1]), device=probs.device)
            draw.exponential_(generator=self._generator)
            noise[torch.tensor(shared, device=probs.device)] = draw
        for j, i in enumerate(random_rows):
            g = generators[i]
            if g is not None:
                noise[j].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        out = greedy_ids.clone()
        out[rows] = sampled
        return [int(t) for t in out.tolist()]
