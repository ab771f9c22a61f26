"""GGUF files written as llama.cpp's converter lays them out load with the source checkpoint's logits and config."""

import math

import pytest
import torch

from longreach.config import ModelConfig
from longreach.model.gguf import GGUFFile, hf_config
from longreach.model.loader import load_model
from tests.model.conftest import make_hf_model
from tests.model.gguf_writer import VOCAB_SIZE, round_trip, write_gguf

pytest.importorskip("transformers")

IDS = torch.randint(0, VOCAB_SIZE, (40,), generator=torch.Generator().manual_seed(1))

# Relative logit error allowed against the unquantized source, |dlogits|_2 / |logits|_2. Per weight, rounding
# leaves an rms relative error of about 2^-11 / sqrt(3) = 3e-4 (F16), and for a block of 32 Gaussian weights
# (max ~2.5 rms) step / sqrt(12) with step = max / 127 (Q8_0) or max / 8 (Q4_0): ~0.6% and ~9%. These tiny random
# models amplify it about 2x on the way to the logits (measured: F16 7e-4, Q8_0 0.9%, Q4_0 15%); the bounds leave
# about 2x over the measurement. The exact check (same rounding applied to the source) is the one that catches bugs.
RELATIVE_BOUND = {"F16": 2e-3, "Q8_0": 0.02, "Q4_0": 0.3}


def _source(model_type, **overrides):
    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, **overrides)
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", 16)
    return make_hf_model(model_type, **kwargs)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).float() if not hasattr(model, "generation_config") else model(ids[None]).logits[0]


def _rounded_copy(hf_model, qtype):
    """The source model with every matrix replaced by its quantize -> dequantize round trip."""
    import copy

    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(round_trip(p, qtype))
    return model


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_logits_match_the_source(tmp_path, model_type, qtype):
    source = _source(model_type)
    path = tmp_path / f"{model_type}-{qtype}.gguf"
    write_gguf(path, source, qtype)
    ours = load_model(path, dtype="fp32")
    got, want = _logits(ours), _logits(source)
    if qtype == "F32":
        assert (got - want).abs().max().item() <= 1e-5
        return
    # exact against the source with the same rounding applied: the permutation and dequantization are right
    exact = _logits(_rounded_copy(source, qtype))
    assert (got - exact).abs().max().item() <= 1e-5
    # and close to the unquantized source, within the type's error
    relative = ((got - want).norm() / want.norm()).item()
    assert relative <= RELATIVE_BOUND[qtype], relative


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_config_matches_the_source(tmp_path, model_type):
    source = _source(model_type, tie_word_embeddings=model_type == "qwen2")
    path = tmp_path / "m.gguf"
    write_gguf(path, source, "F32")
    ours = ModelConfig.from_hf_dict(hf_config(GGUFFile(path)))
    want = ModelConfig.from_hf_dict(source.config.to_dict())
    for field in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "qkv_bias",
        "o_bias",
        "sliding_window",
        "layer_types",
    ):
        assert getattr(ours, field) == getattr(want, field), field
    assert ours.rope.theta == want.rope.theta and ours.rope.rope_type == want.rope.rope_type
    assert math.isclose(ours.rms_norm_eps, want.rms_norm_eps, rel_tol=1e-6)  # stored as float32


def test_tied_embeddings_when_output_is_absent(tmp_path):
    source = _source("llama", tie_word_embeddings=True)
    write_gguf(tmp_path / "tied.gguf", source, "F32")
    model = load_model(tmp_path / "tied.gguf")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (_logits(model) - _logits(source)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_mistral_as_llama_or_mistral_architecture(tmp_path, arch):
    """llama.cpp writes Mistral as 'llama' (known by its name here: no sliding-window key); some tools write
    'mistral' (transformers' GGUF mapping has it) with the same permuted layout."""
    source = _source("mistral", sliding_window=None)
    write_gguf(tmp_path / "m.gguf", source, "F32", arch=arch, name="Mistral tiny")
    ours = load_model(tmp_path / "m.gguf")
    assert ours.config.model_type == "mistral"
    assert (_logits(ours) - _logits(source)).abs().max().item() <= 1e-5


def test_dtype_is_applied(tmp_path):
    write_gguf(tmp_path / "m.gguf", _source("llama"), "Q8_0")
    assert next(load_model(tmp_path / "m.gguf").parameters()).dtype == torch.float32
    assert next(load_model(tmp_path / "m.gguf", dtype="bf16").parameters()).dtype == torch.bfloat16
    write_gguf(tmp_path / "h.gguf", _source("llama"), "F16")
    assert next(load_model(tmp_path / "h.gguf").parameters()).dtype == torch.float16


@pytest.mark.parametrize("low, high", [(1.0, 4.0), (1.5, 6.0)])
def test_llama3_rope_factors_become_llama3_scaling(tmp_path, low, high):
    """llama.cpp writes Llama 3.1 scaling as a rope_freqs.weight tensor: read back as HF's llama3 parameters."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": high}
    rope["original_max_position_embeddings"] = 8192
    source = make_hf_model(
        "llama",
        rope,
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=65536,
    )
    write_gguf(tmp_path / "l3.gguf", source, "F32")
    ours = load_model(tmp_path / "l3.gguf")
    scaling = ours.config.rope.scaling
    assert ours.config.rope.rope_type == "llama3" and scaling["factor"] == 8.0
    assert math.isclose(scaling["low_freq_factor"], low, rel_tol=1e-4)
    assert math.isclose(scaling["high_freq_factor"], high, rel_tol=1e-4)
    ids = torch.arange(VOCAB_SIZE)[:30]
    assert (_logits(ours, ids) - _logits(source, ids)).abs().max().item() <= 1e-5
