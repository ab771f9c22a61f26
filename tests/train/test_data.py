"""Packing: positions restart per document, cu_seqlens mark documents, targets never cross them."""
import json

import pytest
import torch

from longreach.model.tokenizer import ByteTokenizer
from longreach.train.data import IGNORE_INDEX, SequenceStream, collate, list_data_files, read_pieces

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
    assert second.positions[:3].tolist() == [0, 1, 2]             # the continued piece restarts at 0
    ids, labels = first.input_ids.tolist(), first.labels.tolist()
    assert ids[:7] == [BOS, *b"hello", EOS]
    assert labels[:7] == [*b"hello", EOS, IGNORE_INDEX]           # no target across the boundary
    assert labels[15] == IGNORE_INDEX                              # the row's last token: its target is elsewhere
    assert first.num_tokens == 16
    batch = collate([first, second])
    assert batch.meta.cu_seqlens_q.tolist() == [0, 7, 16, 19, 23, 30, 32][:len(batch.meta.cu_seqlens_q)]
    assert batch.meta.cu_seqlens_q[-1] == 32 and batch.num_targets == int((batch.labels != IGNORE_INDEX).sum())


def test_padded_mode_one_document_per_row(tmp_path):
    path = _docs(tmp_path, ["hello", "a" * 30])
    stream = SequenceStream([str(path)], ByteTokenizer(), seq_len=16, packing=False, shuffle=False)
    rows = [next(stream) for _ in range(4)]
    assert [r.num_tokens for r in rows] == [7, 16, 16, 7]           # 32-token doc split 16 + 16 ... then wraps
    assert all(r.seqlens == (16,) for r in rows)
    assert rows[0].input_ids[7:].tolist() == [ByteTokenizer.pad_token_id] * 9
    assert (rows[0].labels[6:] == IGNORE_INDEX).all()


def test_resume_is_exact(corpus):
    stream = SequenceStream([str(corpus)], ByteTokenizer(), seq_len=256, seed=3)
    for _ in range(7):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream).input_ids for _ in range(80)]          # crosses files and an epoch
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
