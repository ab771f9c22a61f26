"""Our logits against Hugging Face transformers', fp32, for every rope type and head layout."""

import pytest
import torch

from longreach.model.loader import load_model

ORIG = 32  # original_max_position_embeddings of the scaled configs; sequences run well past it
HALF = 8  # head_dim 16 -> 8 frequencies
ROPES = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": ORIG,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
        "beta_fast": 16,
        "beta_slow": 2,
    },
    "yarn_untruncated": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": ORIG,
        "attention_factor": 1.3,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIG,
    },
    "longrope": {
        "rope_type": "longrope",
        "original_max_position_embeddings": ORIG,
        "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
        "long_factor": [1.5 + 0.7 * i for i in range(HALF)],
    },
}


def _compare(ours, theirs, ids, atol=1e-4):
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    err = (got - expected).abs().max().item()
    assert err <= atol, f"max-abs logits error {err:.2e} > {atol}"


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("num_kv_heads", [2, 1])  # GQA and MQA
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_logits_match_transformers(hf_checkpoint, model_type, rope, num_kv_heads):
    """Every rope type on each architecture: Qwen2 adds qkv biases; both run full attention here (their
    sliding windows have tests of their own below)."""
    max_pos = ORIG if rope in ("default", "linear", "dynamic") else 4 * ORIG
    path, theirs = hf_checkpoint(
        model_type, ROPES[rope], num_key_value_heads=num_kv_heads, max_position_embeddings=max_pos
    )
    ours = load_model(path, dtype="fp32")
    assert type(theirs).__name__.lower().startswith(model_type)
    ids = torch.randint(0, 128, (2, 3 * ORIG + 5))  # beyond the original length: scaling is exercised
    _compare(ours, theirs, ids)


@pytest.mark.parametrize("rope", ["default", "yarn", "longrope"])
def test_short_sequences_match_too(hf_checkpoint, rope):
    """Below the original length longrope uses its short factors: both branches must match."""
    path, theirs = hf_checkpoint("llama", ROPES[rope], max_position_embeddings=4 * ORIG)
    _compare(load_model(path, dtype="fp32"), theirs, torch.randint(0, 128, (1, ORIG - 3)))


def test_mistral_sliding_window(hf_checkpoint):
    path, theirs = hf_checkpoint(
        "mistral", ROPES["yarn"], sliding_window=16, max_position_embeddings=4 * ORIG
    )
    _compare(load_model(path, dtype="fp32"), theirs, torch.randint(0, 128, (1, 70)))


def test_qwen2_bias_and_per_layer_windows(hf_checkpoint):
    path, theirs = hf_checkpoint(
        "qwen2",
        ROPES["dynamic"],
        use_sliding_window=True,
        sliding_window=12,
        max_window_layers=1,
        tie_word_embeddings=True,
    )
    ours = load_model(path, dtype="fp32")
    assert ours.config.layer_types == ("full_attention", "sliding_attention")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    _compare(ours, theirs, torch.randint(0, 128, (2, 50)))


def test_llama_bias_and_tied_embeddings(hf_checkpoint):
    path, theirs = hf_checkpoint(
        "llama",
        ROPES["llama3"],
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=4 * ORIG,
    )
    _compare(load_model(path, dtype="fp32"), theirs, torch.randint(0, 128, (1, 80)))


def test_flat_input_and_rope_override(hf_checkpoint):
    """A (T,) input gives (T, V); rope_scaling= replaces the checkpoint's rope like editing config.json."""
    path, _ = hf_checkpoint("llama")
    from tests.model.conftest import make_hf_model

    theirs = make_hf_model("llama", ROPES["linear"])
    ours = load_model(path, dtype="fp32", rope_scaling={"rope_type": "linear", "factor": 4.0})
    ids = torch.randint(0, 128, (60,))
    with torch.no_grad():
        got = ours(ids)
        expected = theirs(ids[None]).logits[0]
    assert got.shape == (60, 128)
    assert (got - expected).abs().max().item() <= 1e-4
