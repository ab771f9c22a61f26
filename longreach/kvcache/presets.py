"""Which model the KV-size calculator is about: a named preset of a well-known architecture, or a checkpoint.

Both become a `ModelConfig` through `ModelConfig.from_hf_dict`, the one config.json parser: a preset is the
part of its Hugging Face config.json that sizes the model (shapes, rope), a checkpoint directory brings its
own. Preset names match Hugging Face repo names case-insensitively, with or without the organisation, with or
without '-Instruct' and the older 'Meta-' prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longreach.config import ModelConfig


@dataclass(frozen=True)
class NamedModelConfig:
    """A model config with the name a report shows: a preset's Hub id or a checkpoint's path."""

    name: str
    config: ModelConfig


def _shapes(
    model_type: str,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": 128,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
    }


_LLAMA_3_1_ROPE = {
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
_QWEN_2_5_ROPE = {"rope_theta": 1000000.0, "max_position_embeddings": 131072}
_MISTRAL_ROPE = {"rope_theta": 10000.0, "max_position_embeddings": 32768}

# Numbers from each model's config.json on the Hugging Face Hub (the keys that size it; the rest default).
_PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": _shapes("llama", 32, 32, 8, 4096, 14336, 128256) | _LLAMA_3_1_ROPE,
    "meta-llama/Llama-3.1-70B": _shapes("llama", 80, 64, 8, 8192, 28672, 128256) | _LLAMA_3_1_ROPE,
    "meta-llama/Llama-3.1-405B": _shapes("llama", 126, 128, 8, 16384, 53248, 128256) | _LLAMA_3_1_ROPE,
    "mistralai/Mistral-7B-v0.1": _shapes("mistral", 32, 32, 8, 4096, 14336, 32000) | _MISTRAL_ROPE,
    "Qwen/Qwen2.5-7B": _shapes("qwen2", 28, 28, 4, 3584, 18944, 152064) | _QWEN_2_5_ROPE,
    "Qwen/Qwen2.5-72B": _shapes("qwen2", 80, 64, 8, 8192, 29568, 152064) | _QWEN_2_5_ROPE,
}
PRESETS: dict[str, NamedModelConfig] = {
    name: NamedModelConfig(name, ModelConfig.from_hf_dict(d)) for name, d in _PRESET_CONFIGS.items()
}

# extra look-up keys (already normalized) -> preset name; same shapes as the preset
_ALIASES = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-v0.2": "mistralai/Mistral-7B-v0.1",  # v0.2 changed rope/window, not the shapes
}


def _lookup_key(name: str) -> str:
    """'meta-llama/Meta-Llama-3.1-70B-Instruct' -> 'llama-3.1-70b': organisation, 'meta-' and '-instruct'
    dropped."""
    key = name.strip().rsplit("/", 1)[-1].lower()
    key = key.removeprefix("meta-")
    return key.replace("-instruct", "")


_PRESET_KEYS = {_lookup_key(name): name for name in PRESETS} | _ALIASES

# the keys `ModelConfig.from_hf_dict` cannot do without (it indexes them), checked first for a clear message
_REQUIRED_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
)


def config_from_hf_dict(config: dict[str, Any], name: str) -> ModelConfig:
    """A checkpoint's config.json dict -> ModelConfig; a multimodal config's `text_config` is used when the
    top level has no layer count. Errors name the checkpoint (`name`) and the missing or bad value."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    missing = [key for key in _REQUIRED_KEYS if config.get(key) is None]
    if missing:
        raise ValueError(
            f"{name}: config is missing {missing}; need num_hidden_layers, num_attention_heads, "
            "hidden_size, intermediate_size and vocab_size"
        )
    try:
        return ModelConfig.from_hf_dict(config)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _read_checkpoint_config(path: Path) -> NamedModelConfig:
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: no config.json there; give a checkpoint directory holding a "
            f"Hugging Face config.json or one of the presets: {', '.join(PRESETS)}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
    name = str(path if path.is_dir() else path.parent)
    return NamedModelConfig(name, config_from_hf_dict(config, name))


def resolve_model(name_or_dir: str | Path) -> NamedModelConfig:
    """A checkpoint directory (or its config.json) or a preset name such as 'Llama-3.1-70B'; a .gguf file, a Hub id
    in the local cache or SmolLM2-135M-Instruct as everywhere else (`longreach.model.bundled.resolve_model_path`)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir() or path.name == "config.json":
        return _read_checkpoint_config(path)
    preset = _PRESET_KEYS.get(_lookup_key(str(name_or_dir)))
    if preset is None and (
        path.suffix == ".gguf" or "/" in str(name_or_dir) or str(name_or_dir) == "SmolLM2-135M-Instruct"
    ):
        from longreach.model.bundled import resolve_model_path  # lazy: the GGUF/Hub resolver only when asked

        return _read_checkpoint_config(resolve_model_path(str(name_or_dir)))
    if preset is None:
        raise ValueError(
            f"unknown model {str(name_or_dir)!r}: not a directory with a config.json and not a "
            f"preset; presets: {', '.join(PRESETS)}"
        )
    return PRESETS[preset]
