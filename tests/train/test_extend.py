"""`longreach extend`: the rope rewrite, continued pretraining, and a checkpoint transformers loads."""

import json

import pytest
import torch

from longreach.cli import main as cli_main
from longreach.model.loader import load_model, load_state_dict
from longreach.train.extend import extended_rope
from tests.model.conftest import make_hf_model

BASE = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
}


@pytest.mark.parametrize(
    "rope_type, max_positions",
    [
        ("yarn", 32768),
        ("llama3", 32768),
        ("longrope", 32768),
        ("linear", 32768),
        ("ntk", 32768),
        ("dynamic", 4096),
    ],
)
def test_rewrite_keeps_the_original_length(rope_type, max_positions):
    out = extended_rope(BASE, rope_type, 8)
    rope = out["rope_parameters"]
    assert out["max_position_embeddings"] == max_positions
    assert rope["rope_type"] == rope_type and rope["factor"] == 8 and rope["rope_theta"] == 500000.0
    if rope_type in ("yarn", "llama3", "longrope"):
        assert rope["original_max_position_embeddings"] == 4096
    if rope_type == "longrope":
        assert rope["long_factor"] == [8.0] * 8 and rope["short_factor"] == [1.0] * 8


def test_rewrite_of_an_already_scaled_checkpoint_is_relative_to_its_original_length():
    scaled = {
        **BASE,
        "max_position_embeddings": 16384,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    }
    out = extended_rope(scaled, "yarn", 16, {"beta_fast": 64})
    assert out["max_position_embeddings"] == 65536
    assert out["rope_parameters"]["original_max_position_embeddings"] == 4096
    assert out["rope_parameters"]["beta_fast"] == 64


def test_rewrite_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown rope type 'xpos'"):
        extended_rope(BASE, "xpos", 8)
    with pytest.raises(ValueError, match="factor=1"):
        extended_rope(BASE, "yarn", 1)


def test_extend_trains_and_transformers_loads_the_result(corpus, tmp_path, capsys):
    import transformers

    source = tmp_path / "base"
    make_hf_model(vocab_size=259, max_position_embeddings=32).save_pretrained(source)
    out = tmp_path / "extended"
    assert (
        cli_main(
            [
                "extend",
                "--model",
                str(source),
                "--rope",
                "yarn",
                "--factor",
                "4",
                "--seq-len",
                "128",
                "--data",
                str(corpus),
                "--tokenizer",
                "byte",
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--dtype",
                "fp32",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_parameters"]["original_max_position_embeddings"] == 32
    ours = load_model(out / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", attn_implementation="eager").eval()
    assert hf.config.max_position_embeddings == 128
    ids = torch.randint(0, 259, (120,), generator=torch.Generator().manual_seed(0))  # past the original 32
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids[None]).logits[0], atol=1e-4, rtol=1e-4)
    trained = load_state_dict(out / "final")
    before = load_state_dict(source)
    assert not torch.equal(
        trained["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )

    assert (
        cli_main(
            [
                "extend",
                "--model",
                str(source),
                "--rope",
                "yarn",
                "--factor",
                "4",
                "--seq-len",
                "256",
                "--data",
                str(corpus),
            ]
        )
        == 2
    )
    assert "--seq-len 256 exceeds" in capsys.readouterr().err


def test_extend_without_training_only_rewrites_the_config(tmp_path):
    source = tmp_path / "base"
    make_hf_model(vocab_size=259, max_position_embeddings=32).save_pretrained(source)
    assert (
        cli_main(
            [
                "extend",
                "--model",
                str(source),
                "--rope",
                "llama3",
                "--factor",
                "8",
                "--max-steps",
                "0",
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "x" / "final" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256 and config["rope_parameters"]["rope_type"] == "llama3"
    after, before = load_state_dict(tmp_path / "x" / "final"), load_state_dict(source)
    assert all(torch.equal(after[k], v) for k, v in before.items())
