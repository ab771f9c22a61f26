"""Where the model shipped inside the package lives, and the rule for "no model given"."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODEL_DIR = ASSETS / "demo-model"  # the extended (YaRN x8 + continued pretraining) model
BUNDLED_BASE_MODEL_DIR = ASSETS / "demo-model-base"  # the same model before extension, for the experiment


def resolve_model_path(model: str | None) -> Path:
    """`model` if given, else the bundled demo model; a clear error when neither exists."""
    if model is not None:
        return Path(model)
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        return BUNDLED_MODEL_DIR
    raise FileNotFoundError(
        f"no model given and the bundled demo model is missing at {BUNDLED_MODEL_DIR}; "
        "pass a Hugging Face checkpoint directory (--model DIR)"
    )
