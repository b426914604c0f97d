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
    the part of the text that later tokens could still turn into a stop string.

    Only the last ``len(stop) - 1`` characters matter, and only where they hold the stop's first
    character is a comparison made, so the cost is independent of ``len(text)`` and, for
    ordinary text, about O(sum of the stop strings' lengths) per call (all in C string
    operations)."""
    best = 0
    end = len(text)
    for s in stops:
        if len(s) - 1 <= best:
            continue
        i = text.find(s[0], max(0, end - len(s) + 1))
        # The first candidate that matches is the longest suffix for this stop string.
        while i >= 0 and end - i > best:
            if s.startswith(text[i:]):
                best = end - i
                break
            i = text.find(s[0], i + 1)
    return best
