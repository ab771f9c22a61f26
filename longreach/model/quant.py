"""Weight-only quantization of the model's linear layers, applied as a module swap (gpt-fast's `quantize.py`).

- int8: symmetric, one scale per output channel: W ~ W_int8 * scale[:, None], scale = absmax / 127.
  forward = (x @ W_int8.T) * scale, with the int8 weight cast to the activation dtype per call (or PyTorch's
  fused int8 weight-pack matmul on CPU) — never a dequantized copy of the weight kept around.
- int4: asymmetric, groups of `group_size` (default 128) consecutive input channels share a scale and a min,
  two codes per uint8 along the input dim; the weight is dequantized per call in the activation dtype.

Scales (and int4 mins) are stored in the layer's original dtype, rounded up where rounding would shrink them,
so every weight's error is at most half its own scale. `nn.Linear` layers named in `skip` (default the LM head,
which is always skipped when tied to the embedding) stay as they are.

Pre-quantized checkpoints are ordinary Hugging Face directories: safetensors with `<name>.weight` (int8, or
packed uint8), `<name>.scales` (and `<name>.mins` for int4) next to config.json, whose `quantization_config`
reads {"quant_method": "longreach", "bits": 8 | 4, "group_size": None | G, "modules_to_not_convert": [...]}.
`load_model` picks them up through `maybe_load_quantized`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from longreach.config import ModelConfig
from longreach.kvcache.codecs import pack_int4, quantize_int4, quantize_int8, unpack_int4
from longreach.model.llama import LlamaForCausalLM
from longreach.model.safetensors_io import (
    assign_checked,
    load_state_dict,
    read_config,
    resolve_dtype,
    save_model,
)

QUANT_METHOD = "longreach"
QUANT_MODES = {"int8": 8, "int4": 4}
DEFAULT_INT4_GROUP_SIZE = 128
DEFAULT_SKIP = ("lm_head",)


def check_quantization(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {list(QUANT_MODES)}")
    return mode


def quantize_weight_int8(weight: torch.Tensor, scale_dtype: torch.dtype | None = None):
    """weight (out, in) -> int8 (out, in), scales (out,) in scale_dtype (default the weight's dtype):
    the KV cache's symmetric int8 codec, one scale per output row."""
    return quantize_int8(weight.detach(), scale_dtype or weight.dtype)


def _int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (N, in) @ (weight int8 (out, in) * scales (out,)[:, None]).T -> (N, out) in x's dtype."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        return torch._weight_int8pack_mm(x.contiguous(), weight, scales.to(x.dtype))
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weight (out, in) and per-output-channel scales (out,)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            linear.weight.dtype,
            device="meta",
        )
        module.weight, module.scales = quantize_weight_int8(linear.weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _int8_matmul(x.reshape(-1, self.in_features), self.weight, self.scales)  # (N, out)
        out = out.view(*x.shape[:-1], self.out_features)
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear with packed 4-bit weight (out, in/2), scales and mins (out, in/group_size)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = DEFAULT_INT4_GROUP_SIZE,
        scale_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if group_size < 2 or group_size % 2 or in_features % group_size:
            raise ValueError(
                f"int4 group_size={group_size} must be even and divide in_features={in_features}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        num_groups = in_features // group_size
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, num_groups, dtype=scale_dtype, device=device))
        self.register_buffer("mins", torch.zeros(out_features, num_groups, dtype=scale_dtype, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> "Int4Linear":
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            linear.weight.dtype,
            device="meta",
        )
        codes, scales, mins = quantize_int4(
            linear.weight.detach(), group_size, dim=-1, scale_dtype=linear.weight.dtype
        )  # (out, in), (out, in/G) x2
        module.weight, module.scales, module.mins = pack_int4(codes), scales, mins
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) in dtype."""
        codes = unpack_int4(self.weight).to(dtype).unflatten(-1, (-1, self.group_size))  # (out, in/G, G)
        weight = codes * self.scales.to(dtype)[..., None] + self.mins.to(dtype)[..., None]
        return weight.flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def _is_skipped(name: str, skip: Iterable[str]) -> bool:
    """A module is skipped when a pattern equals its name, its last component(s) or one of its parents."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def _swap_linears(model: nn.Module, make, skip: tuple[str, ...]) -> int:
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _is_skipped(name, skip)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(name, module))
    return len(targets)


def _quantization_config(mode: str, group_size: int, skip: tuple[str, ...]) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "bits": QUANT_MODES[mode],
        "group_size": group_size if mode == "int4" else None,
        "modules_to_not_convert": list(skip),
    }


def _effective_skip(cfg: ModelConfig, skip: Iterable[str]) -> tuple[str, ...]:
    skip = tuple(skip)
    # a tied LM head is the embedding matrix: quantizing it would untie it (and double its storage)
    if cfg.tie_word_embeddings and not _is_skipped("lm_head", skip):
        skip = skip + ("lm_head",)
    return skip


@torch.no_grad()
def quantize_model(
    model: LlamaForCausalLM,
    mode: str = "int8",
    group_size: int = DEFAULT_INT4_GROUP_SIZE,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> LlamaForCausalLM:
    """Swap every nn.Linear not matched by `skip` for Int8Linear / Int4Linear, in place; returns the model.

    The model's config gains a `quantization_config` entry, so `save_quantized` writes it to config.json.
    """
    check_quantization(mode)
    if "quantization_config" in model.config.hf_config:
        raise ValueError(f"model is already quantized ({model.config.hf_config['quantization_config']})")
    skip = _effective_skip(model.config, skip)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        if mode == "int8":
            return Int8Linear.from_linear(linear)
        if linear.in_features % group_size:
            raise ValueError(
                f"int4 group_size={group_size} does not divide {name}.in_features={linear.in_features}"
            )
        return Int4Linear.from_linear(linear, group_size)

    if _swap_linears(model, make, skip) == 0:
        raise ValueError(f"skip={list(skip)} leaves no linear layer to quantize")
    model.config = replace(
        model.config,
        hf_config={
            **model.config.hf_config,
            "quantization_config": _quantization_config(mode, group_size, skip),
        },
    )
    return model


def save_quantized(model: LlamaForCausalLM, path: str | os.PathLike, **kwargs) -> Path:
    """Write a quantized model as a Hugging Face directory (atomically, via `save_model`)."""
    if "quantization_config" not in model.config.hf_config:
        raise ValueError("model is not quantized; call quantize_model(model, 'int8' | 'int4') first")
    return save_model(model, path, **kwargs)


def _parse_quantization_config(qc: Any, path: Path) -> tuple[str, int, tuple[str, ...]]:
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(
            f"{str(path)!r}: quantization_config quant_method={method!r} is not supported; "
            f"longreach loads only its own pre-quantized checkpoints (quant_method={QUANT_METHOD!r})"
        )
    modes = {bits: mode for mode, bits in QUANT_MODES.items()}
    if qc.get("bits") not in modes:
        raise ValueError(
            f"{str(path)!r}: quantization_config bits={qc.get('bits')!r} must be one of {sorted(modes)}"
        )
    mode = modes[qc["bits"]]
    group_size = qc.get("group_size")
    if mode == "int4" and (not isinstance(group_size, int) or group_size < 2):
        raise ValueError(
            f"{str(path)!r}: int4 quantization_config needs an integer group_size, got {group_size!r}"
        )
    return mode, group_size, tuple(qc.get("modules_to_not_convert") or ())


def load_quantized(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    rope_scaling: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """Load a directory written by `save_quantized`. dtype converts the floating tensors (scales, norms,
    embeddings); None keeps them as stored, which makes save -> load bit-exact."""
    path = Path(path)
    hf = read_config(path)
    if "quantization_config" not in hf:
        raise ValueError(f"{str(path)!r} has no quantization_config in config.json; load it with load_model")
    mode, group_size, skip = _parse_quantization_config(hf["quantization_config"], path)
    cfg = ModelConfig.from_hf_dict(hf, rope_scaling=rope_scaling)
    state = load_state_dict(path, resolve_dtype(dtype), device)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        bias = linear.bias is not None
        if mode == "int8":
            return Int8Linear(linear.in_features, linear.out_features, bias, device="meta")
        return Int4Linear(linear.in_features, linear.out_features, bias, group_size, device="meta")

    _swap_linears(model, make, skip)
    assign_checked(model, state, f"{mode}-quantized checkpoint {str(path)!r}")
    return model.eval()


def maybe_load_quantized(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    rope_scaling: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM | None:
    """`load_quantized(path, ...)` when config.json carries a quantization_config, else None (for load_model)."""
    if "quantization_config" not in read_config(path):
        return None
    return load_quantized(path, dtype, rope_scaling, device)
