"""The server's request limits: every bound the request schemas check, in one place.

Each limit is checked when a request is parsed (a 400 naming the field), before anything
reaches the engine. The engine's own limits (``paged_engine.sampling_params``) are reused, so
the server never accepts what the engine would refuse: a bounded number of choices and
log-probabilities, a bounded stop list (each stop string is checked against the new text of
every step), integers that fit the engine's tensors.
"""

from __future__ import annotations

from paged_engine.sampling_params import (
    MAX_INT32,
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)
from paged_engine.sampling_params import SEED_MAX as ENGINE_SEED_MAX
from paged_engine.sampling_params import SEED_MIN as ENGINE_SEED_MIN

__all__ = [
    "MAX_INT32",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "SEED_MAX",
    "SEED_MIN",
]

MAX_N = 128
"""Most choices (``n``) per request; a completion batch of P prompts queues P * n choices."""

SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
"""``seed`` is a signed 64-bit integer, as OpenAI's. Choice j of a request uses ``seed + j``,
which the engine's wider range always holds."""

assert ENGINE_SEED_MIN <= SEED_MIN and SEED_MAX + MAX_N - 1 <= ENGINE_SEED_MAX
