"""GGUF tensor payloads -> torch tensors: dequantization and llama.cpp's Q/K row permutation undone.

Dequantization is the `gguf` package's own (`gguf.quants`, numpy ports of ggml's reference C code, kept in step
with llama.cpp); tests check it against an independent implementation (transformers' torch dequantizers) for
every type listed in `VERIFIED_TYPES`. Blocks run along a row (GGUF dimension 0, our last dimension), so a
dequantized tensor has the Hugging Face layout `(out_features, in_features)` directly.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

# The types tests cross-check; others that gguf.quants dequantizes load too (same code path).
VERIFIED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFTensorTypeError(ValueError):
    """A tensor stored in a type this reader cannot turn into floats."""


def supported_type_names() -> list[str]:
    """Every GGML type name that `dequantize` accepts."""
    readable = {
        name
        for name in GGMLQuantizationType.__members__
        if hasattr(getattr(quants, name, None), "dequantize_blocks")
    }
    return sorted(readable | {"F32", "F16", "BF16"})


def dequantize(tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A `gguf.ReaderTensor` -> a torch tensor of `dtype` in row-major (PyTorch) shape.

    GGUF lists shapes innermost first (`[in_features, out_features]`); the result is `(out_features,
    in_features)`. F32/F16/BF16 are copied (cast once); quantized types are expanded to fp32 then cast.
    """
    qtype = GGMLQuantizationType(int(tensor.tensor_type))
    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = np.asarray(tensor.data)
    if qtype == GGMLQuantizationType.F32:
        out = torch.from_numpy(np.array(data.view(np.float32)))
    elif qtype == GGMLQuantizationType.F16:
        out = torch.from_numpy(np.array(data.view(np.float16)))
    elif qtype == GGMLQuantizationType.BF16:
        # bf16 is the top half of an fp32: widen the raw bits exactly, no rounding anywhere
        bits = np.array(data.view(np.uint16)).astype(np.uint32) << 16
        out = torch.from_numpy(bits.view(np.float32))
    else:
        try:
            values = quants.dequantize(data, qtype)
        except NotImplementedError:
            raise GGUFTensorTypeError(
                f"tensor {tensor.name!r} is stored as {qtype.name}, which cannot be dequantized; "
                f"supported types: {', '.join(supported_type_names())}"
            ) from None
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if out.numel() != int(np.prod(shape)):
        raise ValueError(
            f"tensor {tensor.name!r} ({qtype.name}) holds {out.numel()} values, its shape {shape} needs "
            f"{int(np.prod(shape))}: the file is corrupt"
        )
    return out.reshape(shape).to(dtype)


def type_name(tensor) -> str:
    try:
        return GGMLQuantizationType(int(tensor.tensor_type)).name
    except ValueError:
        return f"unknown type id {int(tensor.tensor_type)}"


def check_type(tensor) -> None:
    """Raise GGUFTensorTypeError naming the tensor and its type when `dequantize` cannot read it."""
    name = type_name(tensor)
    if name not in supported_type_names():
        raise GGUFTensorTypeError(
            f"tensor {tensor.name!r} is stored as {name}, which cannot be dequantized; "
            f"supported types: {', '.join(supported_type_names())}"
        )


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter `permute` of Llama q/k rows (weights or biases).

    The converter turns each head's rotate-half layout (first half, second half) into interleaved pairs:
    `w.reshape(H, 2, D/2, ...).swapaxes(1, 2)`. The inverse reads rows as (H, D/2, 2, ...) and swaps back.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot unpermute {rows} rows over {num_heads} heads: not a multiple of 2 x heads")
    half = rows // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def permute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter `permute` (rotate-half -> interleaved pairs), used to write test files."""
    half = weight.shape[0] // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, 2, half, *rest).transpose(1, 2).reshape(weight.shape).contiguous()
