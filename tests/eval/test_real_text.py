"""Real text (longreach.eval.real_text): locating, checking and normalising the texts, and using them as
the haystack of `longreach eval passkey` and the documents of `longreach eval ppl`.

The tests marked `needs_real_text` read the installed corpus (`make test` installs it); the others build
their own files."""

import hashlib
import io
import re
import tarfile

import pytest

from longreach.eval import real_text
from longreach.eval.real_text import (
    HAYSTACK_TEXTS,
    PPL_TEXTS,
    extract_texts,
    normalize,
    real_text_paths,
    resolve_text_arg,
)


def _installed() -> bool:
    try:
        real_text_paths(list(real_text.TEXTS))
    except FileNotFoundError:
        return False
    return True


needs_real_text = pytest.mark.skipif(
    not _installed(), reason="real text not installed: python -m longreach.eval.real_text install"
)


def test_normalize_joins_wrapped_lines_into_paragraphs():
    raw = "  TITLE\r\n\r\n\r\n  It was a dark\r\nand stormy   night.\r\n \r\nThe end.\r\n"
    assert normalize(raw) == "TITLE\n\nIt was a dark and stormy night.\n\nThe end."


def test_missing_corpus_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_REAL_TEXT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"alice29\.txt.*nowhere.*longreach\.eval\.real_text install"):
        real_text_paths(HAYSTACK_TEXTS)
    with pytest.raises(ValueError, match="unknown real text.*'moby.txt'"):
        real_text_paths(["moby.txt"])


def _fake_sdist(path, texts: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**{f"tests/testdata/{k}": v for k, v in texts.items()}, "LICENSE": b"MIT"}.items():
            info = tarfile.TarInfo(f"{real_text.SDIST_ROOT}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_checks_every_digest(tmp_path, monkeypatch):
    texts = {name: f"Text of {name}.\r\nSecond line.\r\n".encode() for name in real_text.TEXTS}
    digests = {name: ("title " + name, hashlib.sha256(data).hexdigest()) for name, data in texts.items()}
    monkeypatch.setattr(real_text, "TEXTS", digests)
    dest = extract_texts(_fake_sdist(tmp_path / "ok.tar.gz", texts), tmp_path / "out")
    assert (dest / "alice29.txt").read_bytes() == texts["alice29.txt"]
    assert (dest / "LICENSE-brotli").read_bytes() == b"MIT"
    monkeypatch.setenv("LONGREACH_REAL_TEXT", str(dest))
    docs = list(real_text.documents(["alice29.txt", "lcet10.txt"]))
    assert [d.text for d in docs] == ["Text of alice29.txt. Second line.", "Text of lcet10.txt. Second line."]
    texts["lcet10.txt"] = b"tampered"
    with pytest.raises(ValueError, match=r"lcet10\.txt .* has SHA-256"):
        extract_texts(_fake_sdist(tmp_path / "bad.tar.gz", texts), tmp_path / "out2")


def test_resolve_text_arg():
    assert resolve_text_arg(None, HAYSTACK_TEXTS) is None
    assert resolve_text_arg(["filler"], HAYSTACK_TEXTS) is None
    assert [p.name for p in resolve_text_arg(["a.txt", "b.txt"], PPL_TEXTS)] == ["a.txt", "b.txt"]
    with pytest.raises(ValueError, match="'real' cannot be combined"):
        resolve_text_arg(["real", "a.txt"], HAYSTACK_TEXTS)


@needs_real_text
def test_real_corpus_is_long_real_prose():
    docs = {d.name: d for d in real_text.documents(list(real_text.TEXTS))}
    alice = docs["alice29.txt"].text
    assert alice.startswith("ALICE'S ADVENTURES IN WONDERLAND") and len(alice) > 140_000
    assert "Alice was beginning to get very tired of sitting by her sister on the bank" in alice
    assert len(re.findall(r"\d", alice)) == 2  # "EDITION 2.9": a needle's key is the only other number
    assert all(len(docs[n].text) > 140_000 for n in PPL_TEXTS)


@needs_real_text
def test_passkey_needle_sits_at_a_sentence_boundary_of_real_text():
    from longreach.eval.tasks import PASSKEY_INSTRUCTION, PASSKEY_QUESTION, make_sample
    from longreach.model.tokenizer import ByteTokenizer

    haystack = resolve_text_arg(["real"], HAYSTACK_TEXTS)
    alice = haystack[0].read_text()
    for depth in (0, 40, 100):
        s = make_sample("passkey", ByteTokenizer(), 4096, depth, index=1, seed=3, haystack=haystack)
        key = s.expected[0]
        body = s.prompt[len(PASSKEY_INSTRUCTION) + 1 : -len(PASSKEY_QUESTION) - 1]
        before, after = body.split(f"The pass key is {key}. Remember it. {key} is the pass key.")
        assert abs(s.needle_depths[0] - depth) < 10  # the nearest sentence start; sentences run long
        assert before == "" or re.search(r"[.!?'\"]$", before.rstrip()), before[-80:]
        assert (before.strip()[-200:] or after.strip()[:200]) in alice  # the haystack is the book's text
        assert 4000 < s.num_prompt_tokens <= 4096


@needs_real_text
def test_eval_cli_with_real_text(byte_checkpoint, tmp_path):
    """`--haystack real` for passkey and `--data real` for ppl, on a tiny random model at short lengths."""
    import json

    from longreach.cli import main

    out = tmp_path / "passkey"
    argv = ["eval", "passkey", "--model", str(byte_checkpoint), "--lengths", "600", "--depths", "0,100"]
    assert main(argv + ["--samples", "1", "--haystack", "real", "--out", str(out), "--no-plot"]) == 0
    assert len(json.loads((out / "results.json").read_text())["samples"]) == 2
    out = tmp_path / "ppl"
    argv = ["eval", "ppl", "--model", str(byte_checkpoint), "--lengths", "256,512", "--data", "real"]
    assert main(argv + ["--max-windows", "1", "--out", str(out), "--no-plot"]) == 0
    (result,) = json.loads((out / "ppl.json").read_text())
    assert result["num_documents"] == len(PPL_TEXTS) and set(result["perplexity"]) == {"256", "512"}
