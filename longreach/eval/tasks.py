"""Synthetic long-context tasks with known answers, sized in the model's own tokens.

Every generator is deterministic: the same (task, length, depth, index, seed) gives the same prompt.
`length` follows RULER's convention: it is the whole context the model needs, prompt tokens plus the
task's answer budget (`max_new_tokens`), so a model whose window is exactly `length` can run the sample.
The prompt is grown (haystack characters, or list entries) by a secant search on the tokenizer's real
count until it is as long as possible without exceeding `length - max_new_tokens`: with a byte
tokenizer that is exact, with a BPE tokenizer within a token or two.

Tasks (`TASKS`):
- `passkey`: the Landmark-attention / YaRN template — filler ("The grass is green. ..."), the line
  "The pass key is K. Remember it. K is the pass key." at `depth`, then "What is the pass key? The pass key is".
- `niah`: one "special magic number" needle at `depth` of an essay haystack (RULER's niah_single).
- `niah_multikey`: the queried needle at `depth` plus 3 needles with other keys at seeded depths.
- `niah_multivalue`: 4 values for one key (first at `depth`); all must be returned.
- `niah_multiquery`: 4 keys queried at once (first at `depth`); all values must be returned.
- `variable_tracking`: a chain "VAR A = 12345. VAR B = VAR A. ..." starting at `depth`, hops spread to
  the end; every variable holding the value must be named.
- `common_words`: a numbered word list where 10 words repeat more than the rest; name the 10 (no depth).
- `qa`: biographies of generated people; the queried person's document sits at `depth`; a question
  about them (birthplace, employer, pet's name) is answered by string match.

Needles are snapped to the sentence (or document) start nearest the requested depth, as the
needle-in-a-haystack repository does; `Sample.needle_depths` records where they actually landed
(the share, in %, of the haystack characters that precede each target needle).

This module holds the task definitions (policy) and the length search; the needle placement they
share lives in `longreach.eval.needles`, the haystack texts in `longreach.eval.haystack`, and their
words in `longreach.eval.vocabulary`.

Python use:

    from longreach.eval.tasks import make_sample
    sample = make_sample("passkey", tokenizer, length=4096, depth=50, index=0, seed=0)
    sample.prompt, sample.expected, sample.num_prompt_tokens
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from longreach.eval.haystack import EntityDocuments, entity_document, entity_facts, person_name, pseudo_word
from longreach.eval.needles import Built, Needle, haystack_builder, haystack_source
from longreach.eval.vocabulary import ADJECTIVES, NOUNS

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
PASSKEY_QUESTION = "What is the pass key? The pass key is"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # tokens of context tested: prompt + answer budget (RULER's convention)
    depth: float | None  # requested depth (% of the context) of the target needle; None: no depth
    index: int  # sample number within its (length, depth) cell
    seed: int
    prompt: str
    expected: tuple[str, ...]
    scoring: str  # rule for longreach.eval.scoring.score_output
    num_prompt_tokens: int
    max_new_tokens: int
    needle_depths: tuple[float, ...] = ()  # where the target needle(s) landed: % of the haystack before each


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    uses_depth: bool
    max_new_tokens: int  # answer budget in tokens (enough for a byte tokenizer too)
    scoring: str
    # (rng, depth, haystack) -> (builder n -> Built, smallest n, probe n for the slope estimate)
    make: Callable[..., tuple[Callable[[int], Built], int, int]] = field(repr=False)


def _distinct(make: Callable[[], str], count: int) -> list[str]:
    seen: set[str] = set()
    values: list[str] = []
    while len(values) < count:
        value = make()
        if value not in seen:
            seen.add(value)
            values.append(value)
    return values


def _magic_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _magic_value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


_NIAH_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)


def _niah_question(keys: Sequence[str], plural: bool) -> str:
    keys_text = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    if plural:
        return (
            f"\nWhat are all the special magic numbers for {keys_text} mentioned in the provided text? "
            f"The special magic numbers for {keys_text} mentioned in the provided text are"
        )
    return (
        f"\nWhat is the special magic number for {keys_text} mentioned in the provided text? "
        f"The special magic number for {keys_text} mentioned in the provided text is"
    )


def _other_depths(rng: random.Random, count: int) -> list[float]:
    return [round(rng.uniform(0, 100), 1) for _ in range(count)]


# ---------------------------------------------------------------- the tasks


def _make_passkey(rng, depth, haystack, num_digits: int = 5):
    key = str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))
    needle = Needle(f"The pass key is {key}. Remember it. {key} is the pass key.", depth, True)
    source = haystack_source(rng, haystack, filler=PASSKEY_FILLER)
    return haystack_builder(
        source, PASSKEY_INSTRUCTION + "\n", [needle], "\n" + PASSKEY_QUESTION, [key], sep="\n"
    )


def _make_niah(rng, depth, haystack, num_distractors: int = 0):
    keys = _distinct(lambda: _magic_key(rng), 1 + num_distractors)
    values = _distinct(lambda: _magic_value(rng), 1 + num_distractors)
    needles = [Needle(_magic_needle(keys[0], values[0]), depth, True)]
    needles += [
        Needle(_magic_needle(k, v), d, False)
        for k, v, d in zip(keys[1:], values[1:], _other_depths(rng, num_distractors))
    ]
    source = haystack_source(rng, haystack)
    return haystack_builder(source, _NIAH_HEADER, needles, _niah_question(keys[:1], False), values[:1])


def _make_niah_multikey(rng, depth, haystack):
    return _make_niah(rng, depth, haystack, num_distractors=3)


def _make_niah_multivalue(rng, depth, haystack, num_values: int = 4):
    key = _magic_key(rng)
    values = _distinct(lambda: _magic_value(rng), num_values)
    depths = [depth, *_other_depths(rng, num_values - 1)]
    needles = [Needle(_magic_needle(key, v), d, True) for v, d in zip(values, depths)]
    source = haystack_source(rng, haystack)
    return haystack_builder(source, _NIAH_HEADER, needles, _niah_question([key], True), values)


def _make_niah_multiquery(rng, depth, haystack, num_queries: int = 4):
    keys = _distinct(lambda: _magic_key(rng), num_queries)
    values = _distinct(lambda: _magic_value(rng), num_queries)
    depths = [depth, *_other_depths(rng, num_queries - 1)]
    needles = [Needle(_magic_needle(k, v), d, True) for k, v, d in zip(keys, values, depths)]
    source = haystack_source(rng, haystack)
    return haystack_builder(source, _NIAH_HEADER, needles, _niah_question(keys, True), values)


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _make_variable_tracking(rng, depth, haystack, num_hops: int = 4, num_chains: int = 1):
    names = _distinct(lambda: _variable_name(rng), (num_hops + 1) * num_chains)
    values = _distinct(lambda: str(rng.randint(10_000, 99_999)), num_chains)
    needles = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        if c == 0:  # the queried chain starts at `depth`; its hops are spread evenly to the end
            depths = [depth + i * (100.0 - depth) / (num_hops + 1) for i in range(num_hops + 1)]
        else:
            depths = sorted(_other_depths(rng, num_hops + 1))
        statements = [f"VAR {chain[0]} = {values[c]}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])
        ]
        needles += [Needle(s, d, c == 0) for s, d in zip(statements, depths)]
    header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = (
        f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} "
        f"variables are assigned the value {values[0]}, they are:"
    )
    return haystack_builder(haystack_source(rng, haystack), header, needles, question, names[: num_hops + 1])


def _make_common_words(rng, depth, haystack, num_common: int = 10):
    words = _distinct(lambda: pseudo_word(rng), num_common)
    pool_rng = random.Random(rng.randrange(1 << 30))
    shuffle_seed = rng.randrange(1 << 30)
    pool: list[str] = []  # the rare words, drawn once in a fixed order so longer lists extend shorter ones
    seen = set(words)
    header = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    question = (
        f"\nQuestion: What are the {num_common} most common words in the above list? Answer: The top "
        f"{num_common} words that appear most often in the list are:"
    )
    min_entries = 2 * num_common + 1

    def build(num_entries: int) -> Built:
        # common words repeat `reps` times (up to RULER's 30), the others `rare` < `reps` times each
        reps = max(2, min(30, num_entries // (2 * num_common)))
        rare = max(1, min(3, reps // 3))
        num_rare_entries = max(1, num_entries - reps * num_common)
        while len(pool) * rare < num_rare_entries:
            word = pseudo_word(pool_rng)
            if word not in seen:
                seen.add(word)
                pool.append(word)
        entries = [w for w in words for _ in range(reps)] + [pool[i // rare] for i in range(num_rare_entries)]
        random.Random(f"{shuffle_seed}:{num_entries}").shuffle(entries)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        return Built(header + listing + question, tuple(words))

    return build, min_entries, min_entries + 200


_QA_HEADER = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n"
)


def _make_qa(rng, depth, haystack):
    name = person_name(rng)
    facts = entity_facts(rng)
    kind = rng.choice(("city", "company", "pet"))
    question, answer = {
        "city": (f"In which city was {name} born?", facts["city"]),
        "company": (f"Which company does {name} work at?", facts["company"]),
        "pet": (f"What is the name of {name}'s pet {facts['animal']}?", facts["pet"]),
    }[kind]
    source = EntityDocuments(seed=rng.randrange(1 << 30), exclude=[name])
    needle = Needle(entity_document(name, facts), depth, True)
    tail = (
        "\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
        f"other words.\n\nQuestion: {question}\nAnswer:"
    )
    return haystack_builder(source, _QA_HEADER, [needle], tail, [answer], sep="\n\n")


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "passkey", "pass key in repeated filler (Landmark/YaRN)", True, 16, "first_number", _make_passkey
        ),
        TaskSpec("niah", "one magic number at a depth of an essay haystack", True, 32, "all", _make_niah),
        TaskSpec(
            "niah_multikey",
            "the queried needle among 3 with other keys",
            True,
            32,
            "all",
            _make_niah_multikey,
        ),
        TaskSpec("niah_multivalue", "all 4 values of one key", True, 64, "all", _make_niah_multivalue),
        TaskSpec("niah_multiquery", "values of 4 keys asked at once", True, 64, "all", _make_niah_multiquery),
        TaskSpec(
            "variable_tracking",
            "follow a chain of 4 variable assignments",
            True,
            64,
            "all",
            _make_variable_tracking,
        ),
        TaskSpec(
            "common_words", "name the 10 most frequent words of a list", False, 128, "all", _make_common_words
        ),
        TaskSpec(
            "qa", "answer a question about one of many generated biographies", True, 32, "all", _make_qa
        ),
    )
}


# ---------------------------------------------------------------- sizing


def _fit(count: Callable[[int], int], target: int, n_min: int, n_probe: int) -> int:
    """Largest n >= n_min with count(n) <= target, for count increasing and nearly linear in n (regula falsi
    with a bisection every third step so it cannot stall)."""
    lo, lo_count = n_min, count(n_min)
    if lo_count > target:
        raise ValueError(
            f"the task's fixed text alone is {lo_count} tokens, more than the {target} available"
        )
    hi: int | None = None
    hi_count = 0
    probe_count = count(n_probe)
    units_per_token = (n_probe - n_min) / max(probe_count - lo_count, 1)
    if probe_count <= target:
        lo, lo_count = n_probe, probe_count
    else:
        hi, hi_count = n_probe, probe_count
    for step in range(200):
        if hi is not None and hi - lo <= 1:
            return lo
        if hi is None:
            n = lo + max(1, int((target - lo_count) * units_per_token * 1.02) + 2)  # aim just past the target
        elif step % 3 == 2:
            n = (lo + hi) // 2
        else:
            slope = (hi - lo) / max(hi_count - lo_count, 1)
            n = min(max(lo + int((target - lo_count) * slope), lo + 1), hi - 1)
        c = count(n)
        if c <= target:
            lo, lo_count = n, c
            units_per_token = (n - n_min) / max(c - count(n_min), 1)
        else:
            hi, hi_count = n, c
    raise RuntimeError(f"prompt length search did not converge (target {target} tokens)")


def make_sample(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    depth: float | None = None,
    index: int = 0,
    seed: int = 0,
    haystack: Sequence[str | os.PathLike] | None = None,
    max_new_tokens: int | None = None,
) -> Sample:
    """One deterministic prompt of `task` whose tokens plus `max_new_tokens` fill `length`.

    tokenizer: anything with `encode(text) -> list[int]` (the model's own; its BOS counts).
    depth: percent 0..100 of the context where the target needle goes (ignored by `common_words`).
    haystack: text files to use as haystack instead of the built-in synthetic text (not used by `qa`
    and `common_words`, whose context is their own documents / word list).
    max_new_tokens: answer budget; defaults to the task's `TaskSpec.max_new_tokens`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    spec = TASKS[task]
    budget = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={budget} must be >= 1")
    if length <= budget:
        raise ValueError(f"length={length} must exceed the answer budget max_new_tokens={budget}")
    if spec.uses_depth:
        depth = 50.0 if depth is None else float(depth)
        if not 0.0 <= depth <= 100.0:
            raise ValueError(f"depth={depth} must be a percentage in [0, 100]")
    else:
        depth = None
    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}")
    build, n_min, n_probe = spec.make(rng, depth, haystack)
    cache: dict[int, int] = {}

    def count(n: int) -> int:
        if n not in cache:
            cache[n] = len(tokenizer.encode(build(n).prompt))
        return cache[n]

    try:
        n = _fit(count, length - budget, n_min, n_probe)
    except ValueError as exc:
        raise ValueError(f"{task} at length {length}: {exc}; use a longer length") from None
    built = build(n)
    return Sample(
        task=task,
        length=length,
        depth=depth,
        index=index,
        seed=seed,
        prompt=built.prompt,
        expected=built.expected,
        scoring=spec.scoring,
        num_prompt_tokens=count(n),
        max_new_tokens=budget,
        needle_depths=built.needle_depths,
    )
