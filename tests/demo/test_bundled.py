"""The model shipped in the package: it is the default, it is small, and it loads in transformers too."""
import json

import torch

from longreach.model.bundled import BUNDLED_BASE_MODEL_DIR, BUNDLED_MODEL_DIR, resolve_model_path


def test_bundled_model_is_the_default_and_small():
    assert resolve_model_path(None) == BUNDLED_MODEL_DIR
    size = sum(f.stat().st_size for d in (BUNDLED_MODEL_DIR, BUNDLED_BASE_MODEL_DIR) for f in d.iterdir())
    assert size <= 30 * 1024 * 1024
    cfg = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn"
    assert cfg["max_position_embeddings"] == 8 * cfg["rope_parameters"]["original_max_position_embeddings"]


def test_loads_in_transformers_with_the_same_logits():
    import transformers

    from longreach import load_model

    ours = load_model(BUNDLED_MODEL_DIR, dtype="fp32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 1500))   # past the 512-token base length: YaRN is exercised
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)
