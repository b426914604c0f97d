"""Stop strings over a growing text: where one completes, and how much of the text's end could
still become one (and so must not be shown yet)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["find_stop", "partial_stop_len"]


def find_stop(text: str, stops: Sequence[str], new_from: int) -> tuple[int, int] | None:
    """The earliest occurrence ``(begin, end)`` of any of ``stops`` in ``text`` that ends past
    ``new_from`` (the length of the text already checked), or None.

    Only the last ``new_from - (longest stop - 1)`` characters onward are searched, so checking
    after every token costs O(new text + longest stop) per stop string. Among occurrences that
    begin at the same place the shortest wins.
    """
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, new_from - longest + 1)
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s, start)
        if i < 0:
            continue
        hit = (i, i + len(s))
        if best is None or hit < best:
            best = hit
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string:
    the part of the text that later tokens could still turn into a stop string. O(sum of the
    stop strings' squared lengths), independent of ``len(text)``."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
