"""Haystack text for the evaluation tasks: deterministic, digit-free, endlessly long.

A haystack is a `TextSource`: `prefix(num_chars)` returns the first `num_chars` characters of one
fixed, seeded stream (so growing a prompt during length fitting never changes what came before), and
`boundaries(num_chars)` the offsets where a needle may go (sentence or document starts), which is how
needles are "snapped to a sentence end" as in the needle-in-a-haystack repository.

- `SyntheticText`: essay-like English from templates (the default haystack; no digits, so every number
  in a prompt comes from a needle).
- `RepeatedText`: a text repeated end to end — the passkey filler, or user-supplied text files
  (`from_files`), started at a seeded sentence so samples see different parts.
- `EntityDocuments`: short biographies of generated people, the documents of the `qa` task.

The words themselves (parts of speech, templates, names, biography facts) live in
`longreach.eval.vocabulary`; its public makers are re-exported here for existing callers.
"""

from __future__ import annotations

import abc
import bisect
import os
import random
import re
from pathlib import Path
from typing import Iterable

from longreach.eval.vocabulary import (
    ADJECTIVES,
    ADVERBS,
    ANIMALS,
    CITIES,
    INTRANSITIVE,
    NOUNS,
    PLACES,
    PROFESSIONS,
    TEMPLATES,
    TIMES,
    VERBS,
    company_name,
    entity_facts,
    person_name,
    pseudo_word,
)

__all__ = [
    "ANIMALS",
    "CITIES",
    "DOCUMENT_START",
    "PROFESSIONS",
    "SENTENCE_START",
    "EntityDocuments",
    "RepeatedText",
    "SyntheticText",
    "TextSource",
    "company_name",
    "entity_document",
    "entity_facts",
    "person_name",
    "pseudo_word",
    "read_text_files",
]

SENTENCE_START = re.compile(r"(?<=[.!?])\s+")  # a needle goes where the next sentence starts
DOCUMENT_START = re.compile(r"\n\n")


class TextSource(abc.ABC):
    """A seeded, prefix-stable text stream; subclasses implement `_next_piece()`, called until it is long enough."""

    boundary_pattern: re.Pattern = SENTENCE_START

    def __init__(self):
        self._pieces: list[str] = []
        self._length = 0
        self._text = ""
        self._boundaries: list[int] = [0]
        self._scanned = 0

    @abc.abstractmethod
    def _next_piece(self) -> str:
        """The next chunk of text (whole sentences) of this source."""

    def _ensure(self, num_chars: int) -> None:
        if self._length >= num_chars:
            return
        while self._length < num_chars:
            piece = self._next_piece()
            if not piece:
                raise ValueError(f"{type(self).__name__} produced no text")
            self._pieces.append(piece)
            self._length += len(piece)
        self._text = "".join(self._pieces)
        self._pieces = [self._text]
        # boundaries are found incrementally; re-scan a little before the old end so a match is not split
        start = max(0, self._scanned - 4)
        for m in self.boundary_pattern.finditer(self._text, start):
            if m.end() > self._boundaries[-1]:
                self._boundaries.append(m.end())
        self._scanned = len(self._text)

    def prefix(self, num_chars: int) -> str:
        """The first `num_chars` characters of the stream."""
        self._ensure(num_chars)
        return self._text[:num_chars]

    def boundaries(self, num_chars: int) -> list[int]:
        """Offsets in `[0, num_chars]` where a needle may go: 0, each sentence (document) start, and the end
        when the prefix ends a sentence (document); a trailing partial sentence stays after the last needle."""
        self._ensure(num_chars + 8)
        inner = [
            b for b in self._boundaries[: bisect.bisect_right(self._boundaries, num_chars)] if b < num_chars
        ]
        if num_chars and self.boundary_pattern.match(self._text, num_chars):
            inner.append(num_chars)
        return inner or [0]

    def sample(self, num_chars: int = 4000) -> str:
        """A piece of representative text (for estimating characters per token)."""
        return self.prefix(num_chars)


class SyntheticText(TextSource):
    """Essay-like sentences from templates, in paragraphs of 4-8 sentences; no digits."""

    def __init__(self, seed: int | str = 0):
        super().__init__()
        self._rng = random.Random(f"synthetic-text:{seed}")
        self._sentences_left = 0

    def _sentence(self) -> str:
        r = self._rng
        text = r.choice(TEMPLATES).format(
            adj=r.choice(ADJECTIVES),
            adj2=r.choice(ADJECTIVES),
            noun=r.choice(NOUNS),
            noun2=r.choice(NOUNS),
            verb=r.choice(VERBS),
            intrans=r.choice(INTRANSITIVE),
            intrans2=r.choice(INTRANSITIVE),
            intrans_present=r.choice(INTRANSITIVE)[:-2] + "s",
            adverb=r.choice(ADVERBS),
            place=r.choice(PLACES),
            time=r.choice(TIMES),
        )
        return text[0].upper() + text[1:]

    def _next_piece(self) -> str:
        if self._sentences_left == 0:
            self._sentences_left = self._rng.randint(4, 8)
            sep = "\n\n" if self._length else ""
        else:
            sep = " "
        self._sentences_left -= 1
        return sep + self._sentence()


class RepeatedText(TextSource):
    """`text` repeated end to end, starting at the `start`-th sentence (modulo the number of sentences)."""

    def __init__(self, text: str, start: int = 0, separator: str = " "):
        super().__init__()
        text = text.strip()
        if not text:
            raise ValueError("haystack text is empty")
        starts = [0] + [m.end() for m in SENTENCE_START.finditer(text)]
        offset = starts[start % len(starts)]
        self._unit = text[offset:] + separator + text[:offset] if offset else text
        self._separator = separator

    def _next_piece(self) -> str:
        return (self._separator if self._length else "") + self._unit

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike], start: int = 0) -> "RepeatedText":
        """User-supplied haystack: the files' texts joined by blank lines, repeated as needed."""
        return cls(read_text_files(paths), start=start, separator="\n\n")


def read_text_files(paths: Iterable[str | os.PathLike]) -> str:
    """The UTF-8 texts of `paths` joined by blank lines; a clear error for a missing or empty file set."""
    paths = [Path(p) for p in paths]
    texts = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"text file {str(path)!r} does not exist")
        texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
    if not any(texts):
        raise ValueError(f"text files {[str(p) for p in paths]} hold no text")
    return "\n\n".join(t for t in texts if t)


class EntityDocuments(TextSource):
    """Short biographies of generated people, separated by blank lines; `exclude` names never appear."""

    boundary_pattern = DOCUMENT_START

    def __init__(self, seed: int | str = 0, exclude: Iterable[str] = ()):
        super().__init__()
        self._rng = random.Random(f"entity-documents:{seed}")
        self._exclude = set(exclude)

    def _next_piece(self) -> str:
        while True:
            name = person_name(self._rng)
            if name not in self._exclude:
                break
        doc = entity_document(name, entity_facts(self._rng))
        return ("\n\n" if self._length else "") + doc


def entity_document(name: str, facts: dict[str, str]) -> str:
    first = name.split()[0]
    article = "an" if facts["profession"][0] in "aeiou" else "a"
    return (
        f"{name} was born in {facts['city']}. {first} works as {article} {facts['profession']} at "
        f"{facts['company']}. {first} has a pet {facts['animal']} called {facts['pet']}."
    )
