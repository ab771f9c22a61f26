"""Tiny random checkpoints for engine tests (built with transformers, reused from tests/model)."""

import pytest

from tests.model.conftest import make_hf_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(checkpoint dir, transformers model): a 2-layer GQA Llama, vocab 128, positions up to 512."""
    model = make_hf_model("llama", max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """A tiny Llama over the 259-token ByteTokenizer, saved with its tokenizer: text prompts work."""
    from longreach.model.tokenizer import BOS_TOKEN_ID, BYTE_VOCAB_SIZE, EOS_TOKEN_ID, ByteTokenizer

    model = make_hf_model(
        "llama",
        vocab_size=BYTE_VOCAB_SIZE,
        max_position_embeddings=512,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    path = tmp_path_factory.mktemp("byte-llama")
    model.save_pretrained(path)
    ByteTokenizer().save_pretrained(path)
    return path, model
