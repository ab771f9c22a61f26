"""Every recipe under recipes/ is a valid config (data paths pointed at a tiny corpus)."""

import argparse
import tomllib
from pathlib import Path

import pytest

from longreach.train import extend
from longreach.train.config import TrainConfig
from tests.model.conftest import make_hf_model

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(recipe, corpus, tmp_path):
    d = tomllib.loads(recipe.read_text())
    if "model" in d:  # a training recipe
        d["data"]["paths"] = [str(corpus)]
        cfg = TrainConfig.from_dict(d)
        assert cfg.data.seq_len >= 2
        return
    source = tmp_path / "base"  # an extension recipe: [model] comes from the command line
    make_hf_model(vocab_size=259, max_position_embeddings=32).save_pretrained(source)
    parser = argparse.ArgumentParser()
    extend.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(source),
            "--rope",
            "yarn",
            "--factor",
            "16",
            "--config",
            str(recipe),
            "--data",
            str(corpus),
            "--seq-len",
            "512",
        ]
    )
    cfg = extend.extend_config(args)
    assert cfg.model.overrides["max_position_embeddings"] == 512 and cfg.schedule.max_steps > 0
