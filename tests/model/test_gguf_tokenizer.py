"""SentencePiece GGUF vocabularies (tokenizer.ggml.model 'llama': Llama 2, Mistral 7B) rebuilt like transformers'
GGUF tokenizer: merges derived from the scores, '▁' for spaces, byte fallback, bos added by default."""

import numpy as np
import pytest
from gguf import GGUFWriter

from longreach.model.gguf import GGUFError
from longreach.model.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

PIECES = [
    "▁",
    "t",
    "h",
    "e",
    "a",
    "c",
    "s",
    "i",
    "n",
    "▁t",
    "he",
    "▁the",
    "▁a",
    "at",
    "▁c",
    "▁cat",
    "in",
    "▁s",
    "▁sat",
]
TEXTS = ["the cat sat", " the  cat\n\nsat  ", "héllo ünïcode 日本 🤖", "a\tb <s> c</s>", ""]


def _write(path, model="llama", extra_tokens=()):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES + list(extra_tokens)
    types = [2, 3, 3] + [6] * 256 + [1] * (len(PIECES) + len(extra_tokens))
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(PIECES) + len(extra_tokens))]
    w = GGUFWriter(str(path), "llama")
    for add, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16)):
        getattr(w, f"add_{add}")(value)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_vocabulary_equals_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "spm.gguf"
    _write(path)
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.encode("the cat sat")[0] == 1  # bos by default for SentencePiece files, as llama.cpp
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        for skip in (False, True):
            ids = ours.encode(text)
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    vocab = ours._tokenizer.get_vocab()
    assert ours.encode("the cat", add_bos=False) == [vocab["▁the"], vocab["▁cat"]]


def test_unsupported_tokenizer_model_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bert.gguf"
    _write(path, model="bert")
    with pytest.raises(GGUFError, match="tokenizer.ggml.model 'bert' is not supported"):
        load_tokenizer(path)
