"""Checkpoint round trips and the errors a user sees for bad checkpoints."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from longreach import load_model, save_model
from longreach.config import ModelConfig
from longreach.model.loader import build_model


def _state(path):
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    "model_type, rope",
    [
        ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
        ("qwen2", {"rope_type": "linear", "factor": 2.0}),
        ("mistral", {}),
    ],
)
def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_checkpoint, tmp_path, model_type, rope):
    import transformers

    src, theirs = hf_checkpoint(model_type, rope, max_position_embeddings=128)
    ours = load_model(src, dtype="fp32")
    out = save_model(ours, tmp_path / "ours")
    again = load_model(out)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert ours.config == again.config
    ids = torch.randint(0, 128, (1, 90))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, again(ids), atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)


def test_sharded_save_and_load(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")
    ours = load_model(src, dtype="fp32")
    out = save_model(ours, tmp_path / "sharded", max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_dtype_choice(hf_checkpoint):
    src, _ = hf_checkpoint("llama")
    assert next(load_model(src, dtype="bf16").parameters()).dtype == torch.bfloat16
    assert next(load_model(src, dtype=torch.float16).parameters()).dtype == torch.float16
    assert next(load_model(src).parameters()).dtype == torch.float32  # stored dtype


def test_ntk_saves_as_default_rope_with_larger_base(hf_checkpoint, tmp_path):
    import transformers

    src, _ = hf_checkpoint("llama")
    ours = load_model(src, dtype="fp32", rope_scaling={"rope_type": "ntk", "factor": 4.0})
    out = save_model(ours, tmp_path / "ntk")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_missing_shard(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")
    out = save_model(load_model(src), tmp_path / "sharded", max_shard_bytes=50_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim.name)):
        load_model(out)


def test_unsupported_model_type(hf_checkpoint):
    src, _ = hf_checkpoint("llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(src)


def test_shape_mismatch_names_the_tensor(hf_checkpoint):
    src, _ = hf_checkpoint("llama")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 64)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(5, 64\).*\(96, 64\)"):
        load_model(src)


def test_pickled_weights_are_refused(tmp_path):
    cfg = ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 16,
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="safetensors only"):
        load_model(tmp_path)


def test_build_model_is_deterministic_with_seed():
    cfg = ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 16,
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "tie_word_embeddings": True,
        }
    )
    model = build_model(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
