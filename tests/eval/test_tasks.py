"""Task generators: deterministic, sized in the model's tokens, needles where they were asked to be."""

import re
from collections import Counter

import pytest

from longreach.eval.backends import ApproxTokenizer
from longreach.eval.haystack import SyntheticText
from longreach.eval.tasks import (
    _NIAH_HEADER,
    _QA_HEADER,
    PASSKEY_FILLER,
    PASSKEY_INSTRUCTION,
    TASKS,
    make_sample,
)
from longreach.model.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()


@pytest.fixture(params=["byte", "bpe"])
def tokenizer(request, hf_tokenizer):
    return BYTE if request.param == "byte" else hf_tokenizer


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [1024, 4096])
def test_prompt_fills_the_requested_length(task, length, tokenizer):
    sample = make_sample(task, tokenizer, length, depth=30, seed=3)
    total = len(tokenizer.encode(sample.prompt)) + sample.max_new_tokens
    assert total == sample.num_prompt_tokens + sample.max_new_tokens
    assert total <= length
    # one list entry ("123. word ") is the unit of common_words; every other task is filled to a few tokens
    slack = 12 if task == "common_words" else 3
    assert length - total <= slack, (task, length, total)


def _needle_token_depth(tokenizer, prompt, header, needle_start, needle_end, context_end):
    def n(text):
        return len(tokenizer.encode(text))

    before = n(prompt[:needle_start]) - n(prompt[: len(header)])
    after = n(prompt[:context_end]) - n(prompt[:needle_end])
    return 100.0 * before / (before + after)


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_passkey_sits_at_the_requested_depth(depth, tokenizer):
    sample = make_sample("passkey", tokenizer, 4096, depth=depth, seed=1)
    key = sample.expected[0]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    start = sample.prompt.index(needle)
    assert sample.prompt.count(key) == 2  # the key line only: nothing else holds digits
    assert sample.prompt.startswith(PASSKEY_INSTRUCTION + "\n")
    assert sample.prompt.endswith("\nWhat is the pass key? The pass key is")
    context_end = sample.prompt.rindex("\nWhat is the pass key?")
    got = _needle_token_depth(
        tokenizer, sample.prompt, PASSKEY_INSTRUCTION + "\n", start, start + len(needle), context_end
    )
    assert abs(got - depth) <= 1.5, got  # filler sentences are ~5 tokens of ~4000
    assert abs(sample.needle_depths[0] - depth) <= 1.5
    # snapped to a sentence end: the needle is a line of its own between whole filler sentences
    before = sample.prompt[len(PASSKEY_INSTRUCTION) + 1 : start]
    assert before == "" or before.endswith(".\n")


@pytest.mark.parametrize("depth", [0, 33, 50, 80, 100])
def test_niah_needle_sits_at_the_requested_depth(depth, tokenizer):
    sample = make_sample("niah", tokenizer, 4096, depth=depth, seed=2)
    value = sample.expected[0]
    match = re.search(
        r"One of the special magic numbers for ([a-z]+-[a-z]+) is: " + value + r"\.", sample.prompt
    )
    assert match and sample.prompt.count(value) == 1
    assert f"What is the special magic number for {match.group(1)} mentioned" in sample.prompt
    context_end = sample.prompt.rindex("\nWhat is the special magic number")
    got = _needle_token_depth(tokenizer, sample.prompt, _NIAH_HEADER, match.start(), match.end(), context_end)
    assert abs(got - depth) <= 2.5, got  # essay sentences: up to ~100 characters


def test_same_arguments_same_prompt_and_cells_differ():
    a = make_sample("niah_multikey", BYTE, 2048, depth=40, index=1, seed=7)
    assert a == make_sample("niah_multikey", BYTE, 2048, depth=40, index=1, seed=7)
    assert a.prompt != make_sample("niah_multikey", BYTE, 2048, depth=40, index=2, seed=7).prompt
    assert a.prompt != make_sample("niah_multikey", BYTE, 2048, depth=40, index=1, seed=8).prompt


def test_multi_needle_tasks_hold_every_answer():
    multikey = make_sample("niah_multikey", BYTE, 4096, depth=50)
    assert len(re.findall(r"One of the special magic numbers for", multikey.prompt)) == 4
    for task in ("niah_multivalue", "niah_multiquery"):
        sample = make_sample(task, BYTE, 4096, depth=20)
        assert len(sample.expected) == 4 and len(sample.needle_depths) == 4
        assert abs(sample.needle_depths[0] - 20) <= 2.5
        for value in sample.expected:
            assert sample.prompt.count(value) == 1
    asked = make_sample("niah_multiquery", BYTE, 4096).prompt.rsplit("\n", 1)[1].split("?")[0]
    assert len(re.findall(r"[a-z]+-[a-z]+", asked)) == 4  # four keys asked at once


def test_variable_tracking_chain_is_in_order_and_starts_at_depth():
    sample = make_sample("variable_tracking", BYTE, 4096, depth=30, seed=5)
    names = sample.expected
    first = re.search(r"VAR " + names[0] + r" = (\d+)\.", sample.prompt)
    assert first and f"assigned the value {first.group(1)} in the text above" in sample.prompt
    positions = [sample.prompt.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
    assert first.start() < positions[0] and positions == sorted(positions)
    assert abs(sample.needle_depths[0] - 30) <= 2.5
    assert sample.needle_depths == tuple(sorted(sample.needle_depths))


def test_common_words_answer_is_the_most_frequent_words():
    sample = make_sample("common_words", BYTE, 4096, seed=4)
    assert sample.depth is None and sample.needle_depths == ()
    listing = sample.prompt.split("\n")[1]
    words = re.findall(r"\d+\. (\w+)", listing)
    counts = Counter(words)
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(sample.expected)
    assert min(counts[w] for w in sample.expected) > max(c for w, c in counts.items() if w not in top)
    assert [int(i) for i in re.findall(r"(\d+)\. ", listing)] == list(range(1, len(words) + 1))


def test_qa_document_at_depth_answers_the_question():
    sample = make_sample("qa", BYTE, 4096, depth=60, seed=9)
    name = re.search(
        r"Question: (?:In which city was|Which company does|What is the name of) (\w+ \w+)", sample.prompt
    ).group(1)
    docs = [d for d in sample.prompt.split("\n\n") if d.startswith(name + " was born")]
    assert len(docs) == 1 and sample.expected[0] in docs[0]  # one document about them, holding the answer
    assert abs(sample.needle_depths[0] - 60) <= 3


def test_user_haystack_files(tmp_path):
    text = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota. Kappa lambda mu."
    (tmp_path / "hay.txt").write_text(text)
    sample = make_sample("niah", BYTE, 1024, depth=50, haystack=[tmp_path / "hay.txt"])
    assert "Delta epsilon zeta." in sample.prompt and "magic" in sample.prompt
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        make_sample("niah", BYTE, 1024, haystack=[tmp_path / "missing.txt"])


def test_synthetic_text_is_prefix_stable_and_digit_free():
    a, b = SyntheticText(3), SyntheticText(3)
    long = a.prefix(20_000)
    assert b.prefix(5_000) == long[:5_000] and b.prefix(20_000) == long
    assert not re.search(r"\d", long)
    assert all(
        long[p - 2] in ".!?" or long[p - 2 : p] == "\n\n" or p == 0 for p in a.boundaries(20_000)[1:-1]
    )
    assert PASSKEY_FILLER.count(".") == 5


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_sample("nope", BYTE, 1024)
    with pytest.raises(ValueError, match="depth=150"):
        make_sample("niah", BYTE, 1024, depth=150)
    with pytest.raises(ValueError, match="passkey at length 200.*use a longer length"):
        make_sample("passkey", BYTE, 200)
    with pytest.raises(ValueError, match="must exceed the answer budget"):
        make_sample("passkey", BYTE, 10)


def test_approx_tokenizer_is_roughly_a_bpe_count():
    text = SyntheticText(0).prefix(10_000)
    assert 0.15 < len(ApproxTokenizer().encode(text)) / len(text) < 0.4


def _target_needle(task, sample):
    """(header, target needle text, other needle texts, text that ends the context) of a multi-needle task."""
    prompt = sample.prompt
    if task == "variable_tracking":
        names = sample.expected
        value = re.search(r"VAR " + names[0] + r" = (\d+)\.", prompt).group(1)
        others = [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        header = prompt[: prompt.index("\n\n") + 2]
        return header, f"VAR {names[0]} = {value}.", others, "\nQuestion: Find all variables"
    if task == "qa":
        name = re.search(
            r"Question: (?:In which city was|Which company does|What is the name of) (\w+ \w+)", prompt
        ).group(1)
        [doc] = [d for d in prompt.split("\n\n") if d.startswith(name + " was born")]
        return _QA_HEADER, doc, [], "\n\nAnswer the question based on the given documents"
    needles = re.findall(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d+\.", prompt)
    [target] = [n for n in needles if n.endswith(f" {sample.expected[0]}.")]
    end = "\nWhat is the special magic number" if task == "niah_multikey" else "\nWhat are all the special"
    return _NIAH_HEADER, target, [n for n in needles if n != target], end


@pytest.mark.parametrize(
    "task", ["niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "qa"]
)
@pytest.mark.parametrize("length", [2048, 4096])
def test_multi_needle_tasks_target_sits_at_the_requested_token_depth(task, length, hf_tokenizer):
    """The target needle (the queried key's, the first value, the chain's start, the asked-about document)
    lands at the requested depth counted in the model's tokens, the prompt still fills `length`, and the
    other needles neither shift nor duplicate it. With the BPE tokenizer, where characters and tokens differ."""
    tokenizer = hf_tokenizer
    needles_per_task = {
        "niah_multikey": 4,
        "niah_multivalue": 4,
        "niah_multiquery": 4,
        "variable_tracking": 5,
    }
    # needles snap to a sentence start (essay sentences are at most 90 characters) or a document start (qa's
    # biographies, at most 137); at depth 100 a trailing partial sentence stays after the needle
    unit_chars = 140 if task == "qa" else 90
    for depth in (0, 25, 50, 75, 100):
        sample = make_sample(task, tokenizer, length, depth=depth, seed=11)
        total = len(tokenizer.encode(sample.prompt)) + sample.max_new_tokens
        assert total == sample.num_prompt_tokens + sample.max_new_tokens and 0 <= length - total <= 3, (
            depth,
            total,
        )
        header, target, others, end = _target_needle(task, sample)
        assert sample.prompt.startswith(header) and sample.prompt.count(target) == 1
        if task in needles_per_task:
            assert 1 + len(others) == needles_per_task[task] and all(
                sample.prompt.count(o) == 1 for o in others
            )
        # measure on the haystack alone: drop the other needles (and the separator after each) first
        prompt = sample.prompt
        for other in others:
            prompt = (
                prompt.replace(other + " ", "", 1) if other + " " in prompt else prompt.replace(other, "", 1)
            )
        start = prompt.index(target)
        hay_chars = prompt.rindex(end) - len(header) - len(target)
        tolerance = 100.0 * unit_chars / hay_chars + 1.0  # one unit, plus a token's worth of slack
        got = _needle_token_depth(tokenizer, prompt, header, start, start + len(target), prompt.rindex(end))
        assert abs(got - depth) <= tolerance, (depth, got)
        assert abs(sample.needle_depths[0] - depth) <= tolerance, (depth, sample.needle_depths)
