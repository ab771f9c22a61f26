"""The synthetic corpus the bundled demo model is trained on.

Readable filler prose plus in-context retrieval tasks (passkey, key-value lookup, variable
tracking), so a few-million-parameter byte-level model learns to find and copy facts from its
context — the skill every long-context evaluation measures. Deterministic from a seed.
The passkey documents use the Landmark-attention / YaRN template, the same one `longreach eval
passkey` asks with.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

from longreach.eval.tasks import PASSKEY_INSTRUCTION

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"

_SUBJECTS = [
    "The old sailor",
    "A small robot",
    "My neighbour",
    "The teacher",
    "A quiet fox",
    "The river",
    "Every morning the baker",
    "The young pilot",
    "A tired student",
    "The city",
]
_VERBS = [
    "watched",
    "carried",
    "remembered",
    "painted",
    "followed",
    "counted",
    "opened",
    "found",
    "built",
    "sang to",
]
_OBJECTS = [
    "the lighthouse",
    "a basket of apples",
    "the northern road",
    "seven blue stones",
    "the last train",
    "an old map",
    "the garden gate",
    "a paper boat",
    "the evening stars",
    "a wooden bridge",
]
_ENDINGS = [
    "before dawn.",
    "in the rain.",
    "without a word.",
    "for a long time.",
    "near the harbour.",
    "after lunch.",
    "with great care.",
    "once again.",
    "under the bridge.",
    "at the end of the day.",
]


def prose(rng: random.Random, num_bytes: int) -> str:
    """Grammatical filler sentences, about num_bytes long."""
    out, size = [], 0
    while size < num_bytes:
        sentence = (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)} "
        )
        out.append(sentence)
        size += len(sentence)
    return "".join(out)


def _haystack(rng: random.Random, num_bytes: int) -> str:
    """Filler of about num_bytes, ending on a sentence boundary."""
    if rng.random() < 0.6:
        text = (PASSKEY_FILLER * (num_bytes // len(PASSKEY_FILLER) + 1))[:num_bytes]
    else:
        text = prose(rng, num_bytes)[:num_bytes]
    return text[: text.rfind(". ") + 2]


def _insert_at_sentence(haystack: str, needle: str, depth: float) -> str:
    cut = int(len(haystack) * depth)
    stop = haystack.rfind(". ", 0, cut)
    cut = 0 if stop < 0 else stop + 2
    return haystack[:cut] + needle + haystack[cut:]


def passkey_doc(rng: random.Random, num_bytes: int) -> str:
    key = rng.randint(10000, 99999)
    needle = PASSKEY_LINE.format(key=key)
    body = _insert_at_sentence(_haystack(rng, max(num_bytes - len(needle) - 50, 0)), needle, rng.random())
    return f"{body}{PASSKEY_QUESTION} {key}."


def passkey_prompt_doc(rng: random.Random, num_bytes: int, depth: float | None = None) -> str:
    """A passkey document laid out exactly as `longreach eval passkey` asks: the instruction line, the
    haystack cut anywhere (not only at a sentence), the needle and the question on lines of their own.
    depth: where the haystack is cut, as a share of it (default: uniform)."""

    key = rng.randint(10000, 99999)
    needle = PASSKEY_LINE.format(key=key).strip()
    header = PASSKEY_INSTRUCTION if rng.random() < 0.8 else ""
    room = max(num_bytes - len(header) - len(needle) - len(PASSKEY_QUESTION) - 12, 0)
    haystack = (
        (PASSKEY_FILLER * (room // len(PASSKEY_FILLER) + 1))[:room]
        if rng.random() < 0.7
        else prose(rng, room)[:room]
    )
    cut = int(len(haystack) * (rng.random() if depth is None else depth))
    parts = [header, haystack[:cut].strip(), needle, haystack[cut:].strip(), f"{PASSKEY_QUESTION} {key}."]
    return "\n".join(part for part in parts if part)


def passkey_edge_doc(rng: random.Random, num_bytes: int) -> str:
    """An evaluation-layout passkey document with its needle mostly near either end of the haystack.

    A uniform depth puts 1 needle in 20 in the last 5% of a document, and few documents are long, so a
    model trained on uniform depths can be weak exactly there (the demo model was: 0/6 at depths 95-100%
    of 4,096 tokens); this one trains those positions: 45% in the last 10%, 20% in the first 10%,
    35% anywhere. `documents` gives it nearly full-length documents (LONG_MAKERS)."""

    pick = rng.random()
    depth = rng.uniform(0.9, 1.0) if pick < 0.45 else rng.uniform(0.0, 0.1) if pick < 0.65 else rng.random()
    return passkey_prompt_doc(rng, num_bytes, depth=depth)


def kv_doc(rng: random.Random, num_bytes: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    pairs, size = {}, 0
    while size < num_bytes - 60:
        key = "".join(rng.choice(alphabet) for _ in range(4))
        pairs[key] = rng.randint(1000, 9999)
        size += 22
    key = rng.choice(list(pairs))
    records = " ".join(f"key {k} = {v}." for k, v in pairs.items())
    return f"Records: {records} Question: what is the value of key {key}? Answer: {pairs[key]}."


def variable_doc(rng: random.Random, num_bytes: int) -> str:
    value = rng.randint(100, 999)
    names = rng.sample([chr(c) + chr(d) for c in range(65, 91) for d in range(65, 91)], 4)
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = {names[i - 1]}." for i in range(1, len(names))
    ]
    # filler between the statements, in order: the chain must be read front to back
    parts = [prose(rng, max(num_bytes - 120, 0) // len(chain)) if num_bytes > 200 else "" for _ in chain]
    text = "".join(part + statement + " " for part, statement in zip(parts, chain))
    return f"{text}Question: what is the value of VAR {names[-1]}? Answer: {value}."


MIXES = {
    # the base model: language-like filler plus retrieval
    "base": [(passkey_doc, 0.45), (kv_doc, 0.2), (variable_doc, 0.15), (prose, 0.2)],
    # passkeys only: the second stage, which finishes the copy ("induction") circuit the base run started
    "passkey": [(passkey_doc, 1.0)],
    # passkeys in both layouts, the corpus's and the evaluation prompt's: what the retrieval stage ends on
    "passkey-prompt": [(passkey_doc, 0.5), (passkey_prompt_doc, 0.5)],
    # plus nearly full-length documents with needles at the edges: what the bundled model's second
    # extension run trains on (its needles in the last 5% of 4,096 tokens were missed before)
    "passkey-edges": [(passkey_doc, 0.25), (passkey_prompt_doc, 0.25), (passkey_edge_doc, 0.5)],
}
# makers whose documents are drawn from the top eighth of the length range, so their depths are far positions
LONG_MAKERS = (passkey_edge_doc,)


def documents(seed: int, max_bytes: int, min_bytes: int = 64, mix: str = "base") -> Iterator[str]:
    """An endless, seeded stream of documents of up to max_bytes bytes."""
    if mix not in MIXES:
        raise ValueError(f"unknown corpus mix {mix!r}; choose one of {sorted(MIXES)}")
    rng = random.Random(seed)
    makers = MIXES[mix]
    while True:
        num_bytes = rng.randint(min_bytes, max_bytes)
        maker = (
            makers[0][0]
            if len(makers) == 1
            else rng.choices([m for m, _ in makers], weights=[w for _, w in makers])[0]
        )
        if maker in LONG_MAKERS:
            num_bytes = rng.randint(max(min_bytes, max_bytes - max_bytes // 8), max_bytes)
        yield maker(rng, num_bytes)[:max_bytes] if maker is prose else maker(rng, num_bytes)


def write_corpus(
    path: str | Path, num_docs: int, seed: int, max_bytes: int, mix: str = "base", min_bytes: int = 64
) -> Path:
    """JSONL with a `text` field per line: what `longreach train` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = documents(seed, max_bytes, min_bytes=min_bytes, mix=mix)
    with open(path, "w") as f:
        for _ in range(num_docs):
            f.write(json.dumps({"text": next(stream)}) + "\n")
    return path


def write_prose_text(num_bytes: int, seed: int = 0) -> Path:
    """A temporary text file of filler prose and passkey filler (the training distribution's haystacks),
    about num_bytes long: the perplexity text of the extension experiment and the tour."""
    import tempfile

    rng = random.Random(seed)
    path = Path(tempfile.mkdtemp(prefix="longreach-ppl-")) / "prose.txt"
    path.write_text(prose(rng, num_bytes) + PASSKEY_FILLER * (num_bytes // (3 * len(PASSKEY_FILLER))))
    return path
