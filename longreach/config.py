"""Small frozen configs, one per concern, validated on construction.

`ModelConfig` mirrors the fields of a Hugging Face Llama / Mistral / Qwen2 `config.json`,
so a real checkpoint's file loads unchanged and ours load in transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from longreach.kvcache.policies import POLICIES
from longreach.kvcache.quant import check_kv_cache_dtype
from longreach.rope import RopeConfig, rope_config_from_hf

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    model_type: str = "llama"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # the original config.json, kept so saving writes back every key we do not model
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or absent")
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"unsupported layer_types {bad}; supported: {list(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)

    def window_size(self, layer_idx: int) -> tuple[int, int]:
        """FlashAttention (left, right) window of a layer: HF's sliding_window W sees W keys, itself included."""
        if self.layer_types[layer_idx] == "sliding_attention":
            return (self.sliding_window - 1, 0)
        return (-1, -1)

    @staticmethod
    def from_hf_dict(d: dict[str, Any], rope_scaling: dict[str, Any] | None = None) -> "ModelConfig":
        """From a config.json dict; `rope_scaling` overrides the checkpoint's rope config."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"hidden_act={d['hidden_act']!r} is not supported (Llama-family models use 'silu')"
            )
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        sliding_window, layer_types = d.get("sliding_window"), d.get("layer_types")
        num_layers = d["num_hidden_layers"]
        if model_type == "qwen2":
            if not d.get("use_sliding_window", False):
                sliding_window = None
            if layer_types is None:
                first_sliding = d.get("max_window_layers", num_layers)
                layer_types = [
                    "sliding_attention" if sliding_window and i >= first_sliding else "full_attention"
                    for i in range(num_layers)
                ]
        elif model_type == "llama":
            sliding_window = None
        if layer_types is None and sliding_window:
            layer_types = ["sliding_attention"] * num_layers
        attention_bias = bool(d.get("attention_bias", False))
        return ModelConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope=rope_config_from_hf(d, rope_scaling),
            model_type=model_type,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type == "llama" else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=sliding_window,
            layer_types=tuple(layer_types or ()),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_config=copy.deepcopy(d),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that both we and transformers (4.x and 5.x) load with the same meaning."""
        d = copy.deepcopy(self.hf_config)
        for stale in ("rope_scaling", "rope_parameters", "rope_theta", "partial_rotary_factor", "type"):
            d.pop(stale, None)
        rope = self.rope
        if rope.rope_type == "ntk":
            # static NTK is the default rope with a larger base: written that way so every loader understands it
            base_scale = rope.scaling["factor"] ** (rope.rotary_dim / (rope.rotary_dim - 2))
            rope = RopeConfig(
                head_dim=rope.head_dim,
                theta=rope.theta * base_scale,
                partial_rotary_factor=rope.partial_rotary_factor,
                max_position_embeddings=rope.max_position_embeddings,
            )
        d.update(
            {
                "model_type": self.model_type,
                "architectures": [_ARCHITECTURES[self.model_type]],
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "hidden_act": "silu",
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "rope_theta": rope.theta,
                "rope_parameters": rope.to_hf_dict(),
            }
        )
        scaling = {
            k: v for k, v in rope.to_hf_dict().items() if k not in ("rope_theta", "partial_rotary_factor")
        }
        d["rope_scaling"] = scaling if rope.rope_type != "default" else None
        if rope.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = rope.partial_rotary_factor
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type in ("mistral", "qwen2"):
            d["sliding_window"] = self.sliding_window
            if self.model_type == "qwen2":
                d["use_sliding_window"] = self.sliding_window is not None
                d["layer_types"] = list(self.layer_types)
        return d


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache (vLLM's PagedAttention layout): how big a block is and how many blocks there are.

    The block count comes from the first of: `num_blocks`; `kv_cache_memory` bytes; `memory_fraction`
    of the memory free on the device (default 0.9 on GPUs, 0.5 on CPUs, where it is shared with the OS).
    Users' single "bytes or a fraction" value (`LLM(kv_cache_memory=0.5)`, `--kv-cache-memory 4GiB`) is split
    into these two fields by `kv_cache_memory_fields`.
    `kv_cache_dtype` is the storage of K/V (`longreach.kvcache.quant`: auto = the model's dtype, bf16, fp16,
    fp32, int8, fp8 (e4m3; alias fp8_e4m3), int4); `kv_policy` / `kv_policy_args` the eviction policy (`longreach.kvcache.policies`:
    none, window, sinks, h2o, with `make_policy`'s keyword budgets, e.g. {"window": 4096}).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    memory_fraction: float | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    kv_policy: str = "none"
    kv_policy_args: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):

        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.kv_policy not in POLICIES:
            raise ValueError(f"unknown kv_policy {self.kv_policy!r}; choose one of {list(POLICIES)}")
        if not isinstance(self.kv_policy_args, dict):
            raise ValueError(
                f"kv_policy_args={self.kv_policy_args!r} must be a dict of the policy's budgets, "
                "e.g. {'window': 4096}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(
                f"block_size={self.block_size!r} must be a positive integer (16 is the usual choice)"
            )
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num_blocks={self.num_blocks!r} must be a positive integer or absent")
        if self.kv_cache_memory is not None and (
            isinstance(self.kv_cache_memory, bool)
            or not isinstance(self.kv_cache_memory, int)
            or self.kv_cache_memory < 1
        ):
            raise ValueError(
                f"kv_cache_memory={self.kv_cache_memory!r} must be a positive number of bytes or absent"
            )
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction={self.memory_fraction!r} must be in (0, 1] or absent")


def kv_cache_memory_fields(
    value: int | float | None, memory_fraction: float | None = None
) -> tuple[int | None, float | None]:
    """(kv_cache_memory bytes, memory_fraction) from a user's single value: a float in (0, 1] is a fraction of
    the free memory (vLLM's gpu_memory_utilization style), anything from 1 up a count of bytes (4e9 too)."""
    if isinstance(value, float) and 0.0 < value <= 1.0:
        if memory_fraction is not None:
            raise ValueError(
                f"kv_cache_memory={value} is a fraction and memory_fraction={memory_fraction} is "
                "another; give one"
            )
        return None, value
    if value == 1 and not isinstance(value, (bool, float)):
        raise ValueError(
            "kv_cache_memory=1 would be one byte: pass 1.0 for all the free memory, or a size in bytes "
            "(e.g. 4 * 2**30); the CLI's --kv-cache-memory takes 4GiB or 1.0"
        )
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value), memory_fraction
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"kv_cache_memory={value!r} must be a positive number of bytes, a fraction in (0, 1] "
            "of the free memory, or absent"
        )
    return value, memory_fraction


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits (vLLM v1's scheduler): one step runs at most `max_num_seqs` requests
    and `max_num_batched_tokens` tokens; a prompt longer than the budget is prefilled in chunks."""

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    allow_long_max_model_len: bool = False  # past what the rope supports: warn instead of refusing
    enforce_eager: bool = False  # never replay decode steps from CUDA graphs (engine/cuda_graphs.py)

    def __post_init__(self):
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens={self.max_num_batched_tokens} must be "
                f">= max_model_len={self.max_model_len}, or a long prompt could never be scheduled"
            )
