"""longreach: long-context LLMs end to end — extend, train, serve, and prove the context is usable.

The public API is imported lazily, so `import longreach` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "longreach.model.loader",
    "save_model": "longreach.model.loader",
    "ModelConfig": "longreach.config",
    "RopeConfig": "longreach.rope",
    "load_tokenizer": "longreach.model.tokenizer",
    "flash_attn_func": "longreach.attention",
    "flash_attn_varlen_func": "longreach.attention",
    "LLM": "longreach.engine.llm",
    "SamplingParams": "longreach.engine.sampler",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'longreach' has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
