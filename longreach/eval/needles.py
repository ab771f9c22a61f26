"""Needles in a haystack: the prompt plumbing shared by the tasks of `longreach.eval.tasks`.

A task describes its needles (`Needle`: text, requested depth, whether it is asked about); `insert_needles`
puts each at the sentence (or document) boundary of the haystack nearest its depth, as the
needle-in-a-haystack repository does, and reports where the target needles landed. `haystack_builder`
turns that into the `num_chars -> Built` function the length search of `make_sample` grows, and
`haystack_source` picks the haystack: user files, a repeated filler, or the synthetic essay text.
"""

from __future__ import annotations

import bisect
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from longreach.eval.haystack import RepeatedText, SyntheticText, TextSource, read_text_files


@dataclass(frozen=True)
class Needle:
    """One statement to hide in the haystack."""

    text: str
    depth: float  # requested, % of the context
    is_target: bool


@dataclass
class Built:
    """A task's prompt at one size, with its expected answers."""

    prompt: str
    expected: tuple[str, ...]
    needle_depths: tuple[float, ...] = ()


def insert_needles(
    source: TextSource, num_chars: int, needles: Sequence[Needle], sep: str
) -> tuple[str, list[float]]:
    """The haystack's first `num_chars` characters with each needle at the boundary nearest its depth.

    Returns (context, depths of the target needles in needle order: the share (%) of the haystack text that
    precedes each, as the needle-in-a-haystack repository measures depth)."""
    hay = source.prefix(num_chars)
    bounds = source.boundaries(num_chars)
    placed = []
    for order, needle in enumerate(needles):
        want = needle.depth / 100.0 * num_chars
        j = bisect.bisect_left(bounds, want)
        if j == len(bounds) or (j > 0 and want - bounds[j - 1] <= bounds[j] - want):
            j -= 1
        placed.append((bounds[j], order))
    placed.sort()  # needles at the same boundary keep their given order (chains stay in order)
    pieces: list[tuple[str, int | None]] = []
    cursor = 0
    for pos, order in placed:
        pieces.append((hay[cursor:pos], None))
        pieces.append((needles[order].text, order))
        cursor = pos
    pieces.append((hay[cursor:], None))
    out, hay_before, hay_chars = [], {}, 0
    for text, order in pieces:
        text = text.strip() if order is None else text
        if order is not None:
            hay_before[order] = hay_chars
        else:
            hay_chars += len(text)
        if text:
            out.append(text)
    depths = [100.0 * hay_before[i] / max(hay_chars, 1) for i, n in enumerate(needles) if n.is_target]
    return sep.join(out), depths


def haystack_builder(
    source: TextSource,
    header: str,
    needles: Sequence[Needle],
    question: str,
    expected: Sequence[str],
    sep: str = " ",
):
    def build(num_chars: int) -> Built:
        context, depths = insert_needles(source, num_chars, needles, sep)
        return Built(header + context + question, tuple(expected), tuple(depths))

    return build, 0, 2000


@lru_cache(maxsize=8)
def _file_text(paths: tuple[str, ...]) -> str:
    return read_text_files(paths)


def haystack_source(
    rng: random.Random, haystack: Sequence[str | os.PathLike] | None, filler: str | None = None
) -> TextSource:
    """User files (repeated, from a seeded sentence), else `filler` repeated, else the built-in synthetic text."""
    start = rng.randrange(1 << 30)
    if haystack:
        return RepeatedText(_file_text(tuple(str(p) for p in haystack)), start=start, separator="\n\n")
    if filler is not None:
        return RepeatedText(filler)
    return SyntheticText(seed=start)
