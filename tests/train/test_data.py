"""Packing (positions restart per document, targets never cross them), streaming reads, file-order shuffle."""

import io
import json

import pytest
import torch

from longreach.model.tokenizer import ByteTokenizer
from longreach.train import data
from longreach.train.data import (
    CHUNK_BYTES,
    IGNORE_INDEX,
    SequenceStream,
    collate,
    list_data_files,
    read_pieces,
    trim_padding,
)

BOS, EOS = ByteTokenizer.bos_token_id, ByteTokenizer.eos_token_id


def _docs(tmp_path, texts):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_packing_layout(tmp_path):
    path = _docs(tmp_path, ["hello", "world wide", "xy"])
    stream = SequenceStream([str(path)], ByteTokenizer(), seq_len=16, shuffle=False)
    first, second = next(stream), next(stream)
    # documents are <bos> text <eos>: 7, 12, 4 tokens; the second is split across rows
    assert first.seqlens == (7, 9) and second.seqlens[0] == 3
    assert first.positions.tolist() == list(range(7)) + list(range(9))
    assert second.positions[:3].tolist() == [0, 1, 2]  # the continued piece restarts at 0
    ids, labels = first.input_ids.tolist(), first.labels.tolist()
    assert ids[:7] == [BOS, *b"hello", EOS]
    assert labels[:7] == [*b"hello", EOS, IGNORE_INDEX]  # no target across the boundary
    assert labels[15] == IGNORE_INDEX  # the row's last token: its target is elsewhere
    assert first.num_tokens == 16
    batch = collate([first, second])
    assert batch.meta.cu_seqlens_q.tolist() == [0, 7, 16, 19, 23, 30, 32][: len(batch.meta.cu_seqlens_q)]
    assert batch.meta.cu_seqlens_q[-1] == 32 and batch.num_targets == int(
        (batch.labels != IGNORE_INDEX).sum()
    )


def test_padded_mode_one_document_per_row(tmp_path):
    path = _docs(tmp_path, ["hello", "a" * 30])
    stream = SequenceStream([str(path)], ByteTokenizer(), seq_len=16, packing=False, shuffle=False)
    rows = [next(stream) for _ in range(4)]
    assert [r.num_tokens for r in rows] == [7, 16, 16, 7]  # 32-token doc split 16 + 16 ... then wraps
    assert all(r.seqlens == (16,) for r in rows)
    assert rows[0].input_ids[7:].tolist() == [ByteTokenizer.pad_token_id] * 9
    assert (rows[0].labels[6:] == IGNORE_INDEX).all()


def test_trim_padding_pads_a_batch_to_its_longest_row(tmp_path):
    path = _docs(tmp_path, ["hello", "abcdefgh", "xy"])  # 7, 10 and 4 tokens with bos/eos
    stream = SequenceStream([str(path)], ByteTokenizer(), seq_len=16, packing=False, shuffle=False)
    rows = [next(stream) for _ in range(3)]
    trimmed = trim_padding(rows)
    assert [len(r.input_ids) for r in trimmed] == [10, 10, 10]
    assert [r.seqlens for r in trimmed] == [(10,), (10,), (10,)]
    for row, cut in zip(rows, trimmed):
        assert torch.equal(cut.labels, row.labels[:10]) and torch.equal(cut.positions, row.positions[:10])
        assert cut.num_tokens == row.num_tokens
    full = [next(SequenceStream([str(path)], ByteTokenizer(), seq_len=16, shuffle=False))]
    assert trim_padding(full) == full  # packed rows have no padding to cut


def test_resume_is_exact(corpus):
    stream = SequenceStream([str(corpus)], ByteTokenizer(), seq_len=256, seed=3)
    for _ in range(7):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream).input_ids for _ in range(80)]  # crosses files and an epoch
    resumed = SequenceStream([str(corpus)], ByteTokenizer(), seq_len=256, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed).input_ids) for a in expected)
    assert stream.epoch >= 1


def test_text_file_pieces_split_on_utf8_boundaries(tmp_path):
    path = tmp_path / "t.txt"
    text = "é" * 100 + "\n" + "ü" * 50
    path.write_text(text)
    pieces = list(read_pieces(path, chunk_bytes=7))
    assert "".join(p.text for p in pieces) == text
    assert pieces[0].is_doc_start and pieces[-1].is_doc_end and not pieces[1].is_doc_start


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_data_files([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="seq_len=1"):
        SequenceStream([str(_docs(tmp_path, ["x"]))], ByteTokenizer(), seq_len=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        next(SequenceStream([str(bad)], ByteTokenizer(), seq_len=8))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="no text"):
        next(SequenceStream([str(empty)], ByteTokenizer(), seq_len=8))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="suffix"):
        list_data_files([str(tmp_path / "x.csv")])


class _CountingFileIO(io.FileIO):
    """A raw file that counts the bytes pulled from disk."""

    bytes_read = 0

    def readinto(self, buffer):
        n = super().readinto(buffer)
        _CountingFileIO.bytes_read += n or 0
        return n

    def read(self, size=-1):
        chunk = super().read(size)
        _CountingFileIO.bytes_read += len(chunk or b"")
        return chunk

    def readall(self):
        chunk = super().readall()
        _CountingFileIO.bytes_read += len(chunk)
        return chunk


class _CountingTokenizer(ByteTokenizer):
    chars_encoded = 0

    def encode(self, text, add_bos=False):
        _CountingTokenizer.chars_encoded += len(text)
        return super().encode(text, add_bos)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_files_are_read_and_tokenized_as_they_stream(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"big{suffix}"
    line = "the quick brown fox jumps over the lazy dog " * 2
    if suffix == ".txt":
        path.write_text(f"{line}\n" * 50_000)  # one 4.5 MB document
    else:
        path.write_text((json.dumps({"text": line}) + "\n") * 40_000)  # 40,000 documents
    size = path.stat().st_size
    assert size > 3_000_000
    monkeypatch.setattr(
        data, "open", lambda p, mode="r": io.BufferedReader(_CountingFileIO(p, "r")), raising=False
    )
    _CountingFileIO.bytes_read = _CountingTokenizer.chars_encoded = 0
    stream = SequenceStream([str(path)], _CountingTokenizer(), seq_len=64, shuffle=False)
    first = next(stream)
    assert first.num_tokens == 64 and first.input_ids[1:5].tolist() == list(b"the ")
    # one chunk (64 KiB, then to the line's end) for a text file, one buffer of lines for JSONL
    assert 0 < _CountingFileIO.bytes_read <= CHUNK_BYTES + io.DEFAULT_BUFFER_SIZE + len(line) + 1
    assert _CountingTokenizer.chars_encoded <= CHUNK_BYTES + len(line) + 1
    assert _CountingFileIO.bytes_read < size / 40
    # the cursor is a byte offset that moves through the file as rows are taken
    for _ in range(3 * CHUNK_BYTES // 64):
        next(stream)
    assert 2 * CHUNK_BYTES <= stream.state_dict()["offset"] <= 4 * CHUNK_BYTES
    assert _CountingFileIO.bytes_read <= 5 * CHUNK_BYTES


def test_shuffle_reorders_files_never_documents_within_a_file(tmp_path):
    names = {}
    for prefix in "ab":
        path = tmp_path / f"{prefix}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{prefix}{i}"}) + "\n" for i in range(10)))
        names[prefix] = [f"{prefix}{i}" for i in range(10)]

    def epochs(shuffle, seed=0, count=6):
        stream = SequenceStream(
            [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
            ByteTokenizer(),
            seq_len=8,
            packing=False,
            shuffle=shuffle,
            seed=seed,
        )
        texts = [
            bytes(t for t in next(stream).input_ids.tolist() if t < 256).decode() for _ in range(20 * count)
        ]
        return [texts[i : i + 20] for i in range(0, len(texts), 20)]

    assert all(e == names["a"] + names["b"] for e in epochs(shuffle=False))
    orders = set()
    for seed in range(3):
        for epoch in epochs(shuffle=True, seed=seed):
            assert epoch in (names["a"] + names["b"], names["b"] + names["a"])  # whole files, in file order
            orders.add(epoch[0][0])
    assert orders == {"a", "b"}  # the file order does change
    single = SequenceStream([str(tmp_path / "a.jsonl")], ByteTokenizer(), seq_len=8, packing=False, seed=5)
    assert [
        bytes(t for t in next(single).input_ids.tolist() if t < 256).decode() for _ in range(20)
    ] == names["a"] * 2  # one file: read front to back
