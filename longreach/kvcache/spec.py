"""KV-cache size and prefill cost of a decoder-only transformer: the one calculator, built on `ModelConfig`.

Memory follows the usual accounting (vLLM, the GQA paper): every layer stores one key and one value
vector per KV head per token, so

    KV bytes/token = 2 * num_layers * num_kv_heads * head_dim * bytes_per_value   (+ quantization scales)

Llama-3.1-70B (80 layers, 8 KV heads, head_dim 128) needs 320 KiB/token in bf16, i.e. 40.0 GiB for one
131,072-token request; with one KV head per query head (no GQA, 64 heads) it would need 320 GiB.
Every layer is assumed to keep the full context (no sliding window, no eviction; the bounded size under an
eviction policy is `spec_policies`).

KV dtypes and their scale overhead (kept separate from the data so the cost of a scheme is visible). The
scale dtype and the int4 group size are the codecs' (`kvcache.codecs`), so this agrees with what the quantized
cache (`kvcache.quant`) stores:

- bf16 / fp16: 2 bytes per value, no scales.
- fp8 (e4m3, alias fp8_e4m3): 1 byte per value + one fp16 scale per (token, KV head) for K and for V, as int8
  (vLLM's per-tensor scale would cost nothing per token; ours is per token and head, `kvcache.quant`).
- int8: 1 byte per value + one fp16 scale per (token, KV head) for K and for V (symmetric, per-token).
- int4: 0.5 byte per value, asymmetric, group size 32 with an fp16 scale and an fp16 zero point per group
  (KIVI, arXiv 2402.02750: keys grouped per channel along 32 tokens, values per token along 32 channels).
  Either way there are values/32 groups, i.e. 4 bytes per 32 values; a key group spans 32 tokens, so the
  per-token figure is amortized. KIVI's full-precision window of recent tokens (128) is a per-sequence cost,
  not counted here (`quant.kv_window_bytes_per_sequence`).

Prefill compute per request of N tokens (forward only; the usual 2-FLOPs-per-multiply-add rule):

    dense     = 2 * num_params_nonembedding * N        (attention projections, SwiGLU MLP, norms)
    lm_head   = 2 * hidden_size * vocab_size * N       (counted for every position, an upper bound:
                                                         a server computes logits only for the last one)
    attention = 4 * num_layers * num_attention_heads * head_dim * N^2 / 2
                                                        (QK^T and PV, halved by the causal mask)
    GPU-seconds = FLOPs / (peak_flops * mfu);  $ = GPU-seconds * price_per_gpu_hour / 3600
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from longreach.config import ModelConfig
from longreach.kvcache.codecs import INT4_GROUP_SIZE, SCALE_DTYPE

KiB = 1024
GiB = 1024**3

DEFAULT_GPU_PRICE_PER_HOUR = 3.0  # $/GPU-hour, a typical on-demand H100 rate
DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense (no sparsity)

# KV dtype -> bits per stored value
KV_DTYPES: dict[str, int] = {"bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
KV_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}  # vLLM's other name for e4m3 storage
SCALE_BYTES = SCALE_DTYPE.itemsize  # int8 / fp8 scales and int4 scales/minimums are in the codecs' dtype


class KVBytes(NamedTuple):
    """Bytes of K and V: the stored values (`data`) and their quantization scales, kept apart."""

    data: float
    scales: float

    @property
    def total(self) -> float:
        return self.data + self.scales


def check_kv_dtype(dtype: str) -> str:
    """The dtype's name (an alias resolved: 'fp8_e4m3' -> 'fp8'); an unknown one is an error naming it."""
    if dtype not in KV_DTYPES and dtype not in KV_DTYPE_ALIASES:
        raise ValueError(f"unknown KV dtype {dtype!r}; supported: {', '.join(KV_DTYPES)}")
    return KV_DTYPE_ALIASES.get(dtype, dtype)


def kv_bytes_per_token(model: ModelConfig, dtype: str = "bf16") -> KVBytes:
    """K and V of one token across all layers (scheme in the module docstring)."""
    dtype = check_kv_dtype(dtype)
    num_layers, num_kv_heads = model.num_hidden_layers, model.num_key_value_heads
    num_values = 2 * num_layers * num_kv_heads * model.head_dim  # K and V
    data_bytes = num_values * KV_DTYPES[dtype] / 8
    if dtype in ("int8", "fp8"):
        scale_bytes = 2 * num_layers * num_kv_heads * SCALE_BYTES  # one scale per (token, head), K and V
    elif dtype == "int4":
        scale_bytes = num_values / INT4_GROUP_SIZE * 2 * SCALE_BYTES  # scale + zero point per group
    else:
        scale_bytes = 0.0
    return KVBytes(data_bytes, scale_bytes)


def kv_bytes_per_request(model: ModelConfig, context_len: int, dtype: str = "bf16") -> KVBytes:
    """K and V of one request holding `context_len` tokens."""
    per_token = kv_bytes_per_token(model, dtype)
    return KVBytes(per_token.data * context_len, per_token.scales * context_len)


def without_gqa(model: ModelConfig) -> ModelConfig:
    """The same model with one KV head per query head (multi-head attention)."""
    return replace(model, num_key_value_heads=model.num_attention_heads)


def kv_bytes_per_request_without_gqa(model: ModelConfig, context_len: int, dtype: str = "bf16") -> KVBytes:
    """As `kv_bytes_per_request` with num_kv_heads = num_attention_heads."""
    return kv_bytes_per_request(without_gqa(model), context_len, dtype)


def num_params(model: ModelConfig, include_embeddings: bool = True) -> int:
    """Parameter count: q/k/v/o projections (no biases), SwiGLU MLP, two RMSNorms per layer, final norm,
    plus the input embedding and (when untied) the lm head when `include_embeddings`."""
    hidden = model.hidden_size
    attention = hidden * model.head_dim * (2 * model.num_attention_heads + 2 * model.num_key_value_heads)
    mlp = 3 * hidden * model.intermediate_size
    per_layer = attention + mlp + 2 * hidden
    total = model.num_hidden_layers * per_layer + hidden
    if include_embeddings:
        total += (1 if model.tie_word_embeddings else 2) * model.vocab_size * hidden
    return total


def prefill_flops(model: ModelConfig, num_tokens: int) -> dict[str, float]:
    """Forward FLOPs to prefill one request of `num_tokens` tokens, by term (formulas in the module
    docstring)."""
    dense = 2.0 * num_params(model, include_embeddings=False) * num_tokens
    lm_head = 2.0 * model.hidden_size * model.vocab_size * num_tokens
    attention = 4.0 * model.num_hidden_layers * model.num_attention_heads * model.head_dim * num_tokens**2 / 2
    return {"dense": dense, "lm_head": lm_head, "attention": attention, "total": dense + lm_head + attention}


def prefill_cost(
    flops: float,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    mfu: float = DEFAULT_MFU,
    gpu_price_per_hour: float = DEFAULT_GPU_PRICE_PER_HOUR,
) -> tuple[float, float]:
    """(GPU-seconds, dollars) to run `flops` at `mfu` of `peak_tflops`, priced per GPU-hour."""
    gpu_seconds = flops / (peak_tflops * 1e12 * mfu)
    return gpu_seconds, gpu_seconds * gpu_price_per_hour / 3600
