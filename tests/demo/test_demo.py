"""The demo model's corpus, and the extension experiment end to end at small size."""

import argparse
import json
import random
import re

from longreach.demo.corpus import (
    PASSKEY_QUESTION,
    documents,
    kv_doc,
    passkey_doc,
    passkey_prompt_doc,
    variable_doc,
)


def test_corpus_documents_carry_their_answers():
    rng = random.Random(0)
    doc = passkey_doc(rng, 400)
    key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", doc).group(1)
    assert doc.endswith(f"{PASSKEY_QUESTION} {key}.")
    doc = kv_doc(rng, 300)
    asked = re.search(r"value of key (\w+)\? Answer: (\d+)\.$", doc)
    assert f"key {asked.group(1)} = {asked.group(2)}." in doc
    doc = variable_doc(rng, 500)
    names = re.findall(r"VAR (\w+) = ", doc)
    value = re.search(r"Answer: (\d+)\.$", doc).group(1)
    assert doc.index(f"VAR {names[0]} = {value}.") < doc.index(
        f"VAR {names[1]} = {names[0]}."
    )  # chain in order


def test_prompt_layout_documents_are_the_eval_prompt_plus_its_answer():
    """The retrieval stage's second layout is what `longreach eval passkey` asks, answer appended."""
    from longreach.eval.tasks import PASSKEY_INSTRUCTION, make_sample
    from longreach.model.tokenizer import ByteTokenizer

    rng = random.Random(1)
    docs = [passkey_prompt_doc(rng, 500) for _ in range(40)]
    assert sum(d.startswith(PASSKEY_INSTRUCTION + "\n") for d in docs) > 20  # most carry the instruction
    for doc in docs:
        key = re.search(r"\nThe pass key is (\d+)\. Remember it\. \1 is the pass key\.\n", doc).group(1)
        assert doc.endswith(f"\n{PASSKEY_QUESTION} {key}.") and len(doc) <= 520
    prompt = make_sample("passkey", ByteTokenizer(), 512, 50, 0, 0).prompt
    assert prompt.startswith(PASSKEY_INSTRUCTION + "\nThe grass is green.") and prompt.endswith(
        "\n" + PASSKEY_QUESTION
    )
    stream = documents(0, 500, min_bytes=100, mix="passkey-prompt")
    layouts = {"\n" in doc for doc in (next(stream) for _ in range(40))}  # both layouts are in the mix
    assert layouts == {True, False}


def test_corpus_is_seeded_and_bounded():
    a, b = documents(3, 300), documents(3, 300)
    first = [next(a) for _ in range(50)]
    assert first == [next(b) for _ in range(50)]
    assert all(len(d) <= 400 for d in first)


def test_extension_experiment_writes_tables_and_plots(tmp_path):
    from longreach.demo.experiment import run_experiment

    args = argparse.Namespace(base=None, extended=None, samples=1, multiples="1,2", out=str(tmp_path))
    assert run_experiment(args) == 0
    report = (tmp_path / "extension.md").read_text()
    for setting in (
        "no scaling",
        "PI (linear x8)",
        "NTK-aware (x8)",
        "dynamic NTK (x8)",
        "YaRN (x8)",
        "YaRN x8 + continued pretraining",
    ):
        assert f"| {setting} |" in report
    data = json.loads((tmp_path / "img" / "extension.json").read_text())
    ppl = data["perplexity"]
    # measured, not assumed: past its 512 trained positions the unscaled base model's perplexity jumps,
    # while the extended model's stays low
    assert ppl["no scaling"]["1024"] > 10 * ppl["YaRN x8 + continued pretraining"]["1024"]
    assert (tmp_path / "img" / "extension-ppl.png").stat().st_size > 10_000


def test_edge_mix_trains_far_needles_near_both_ends():
    """passkey-edges: half its documents are nearly full length with the needle in the first or last 10%
    of the haystack most of the time (the positions the bundled model missed at 4,096 tokens)."""
    from longreach.demo.corpus import passkey_edge_doc

    stream = documents(5, 4088, min_bytes=100, mix="passkey-edges")
    docs = [next(stream) for _ in range(200)]
    depths = []
    for doc in docs:
        m = re.search(r"\nThe pass key is (\d+)\. Remember it\. \1 is the pass key\.\n", doc)
        if m and len(doc) >= 4088 - 4088 // 8 - 100:
            depths.append(m.start() / len(doc))
    assert len(depths) > 60  # the long evaluation-layout documents
    late = sum(d > 0.85 for d in depths) / len(depths)
    early = sum(d < 0.15 for d in depths) / len(depths)
    assert late > 0.3 and early > 0.15, (late, early)
    doc = passkey_edge_doc(random.Random(0), 1000)
    assert doc.endswith(".") and PASSKEY_QUESTION in doc
