"""Hugging Face checkpoint directories <-> our model.

Reads config.json and `model.safetensors` (or shards listed in `model.safetensors.index.json`),
builds the model on the meta device and assigns the tensors (no double allocation, nothing
unpickled); quantized checkpoints (`quant.save_quantized`) load with their quantized linears. The file
I/O, including the atomic save, is `safetensors_io.py`'s; its names are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from longreach.config import ModelConfig
from longreach.model.gguf import is_gguf_file, load_gguf_model
from longreach.model.llama import LlamaForCausalLM
from longreach.model.quant import maybe_load_quantized
from longreach.model.resolve import gguf_source, resolve_model
from longreach.model.safetensors_io import (  # noqa: F401
    DTYPES,
    assign_checked,
    load_state_dict,
    read_config,
    resolve_dtype,
    save_model,
)


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    init: bool = True,
) -> LlamaForCausalLM:
    """A fresh model (random init with std 0.02 like HF's Llama) on `device`, built without meta-to-real copies."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    if init:
        init_weights(model)
    return model


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, std: float = 0.02, seed: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    rope_scaling: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """Load a model: a Hugging Face checkpoint directory, a `.gguf` file or a Hub id from the local cache
    (`resolve.resolve_model`).

    dtype: fp32 / bf16 / fp16 (or a torch.dtype); None keeps the stored dtype (fp32 for quantized GGUF tensors).
    rope_scaling: replaces the checkpoint's rope config (same dict format as config.json's
    `rope_scaling` / `rope_parameters`, e.g. {"rope_type": "yarn", "factor": 4, ...}).
    A checkpoint written by `longreach.model.quant.save_quantized` loads with its quantized linears.
    """
    path = Path(path).expanduser()
    if path.is_file() and (path.suffix == ".gguf" or is_gguf_file(path)):
        return load_gguf_model(path, resolve_dtype(dtype), rope_scaling, device)
    if not path.is_dir():
        path = resolve_model(path)
    source = gguf_source(path)
    if source is not None:
        return load_gguf_model(source, resolve_dtype(dtype), rope_scaling, device)
    quantized = maybe_load_quantized(path, dtype, rope_scaling, device)
    if quantized is not None:
        return quantized
    cfg = ModelConfig.from_hf_dict(read_config(path), rope_scaling=rope_scaling)
    state = load_state_dict(path, resolve_dtype(dtype), device)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assign_checked(model, state, f"checkpoint {str(path)!r}")
    return model.eval()
