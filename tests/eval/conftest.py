"""Shared fixtures: a tiny random byte-level checkpoint and a tiny trained BPE tokenizer."""

import json

import pytest

from tests.model.conftest import hf_checkpoint, make_hf_model  # noqa: F401  (hf_checkpoint: a fixture, re-exported)


@pytest.fixture(scope="session")
def byte_checkpoint(tmp_path_factory):
    """A tiny random Llama with the ByteTokenizer saved next to it (vocab 259, window 4096)."""
    from longreach.model.tokenizer import ByteTokenizer

    path = tmp_path_factory.mktemp("ckpt") / "tiny-byte"
    model = make_hf_model(
        vocab_size=259, max_position_embeddings=4096, bos_token_id=256, eos_token_id=257, pad_token_id=258
    )
    model.save_pretrained(path)
    ByteTokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    """A byte-level BPE (vocab 600) trained on our own haystack text, loaded through load_tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from longreach.eval.haystack import EntityDocuments, SyntheticText
    from longreach.model.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SyntheticText(0).prefix(50_000), EntityDocuments(0).prefix(20_000)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return load_tokenizer(path)
