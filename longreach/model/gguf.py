"""GGUF files (llama.cpp's format) -> our config, weights and model.

Read with the `gguf` package (llama.cpp's own reader). The config comes from the `{arch}.*` metadata keys
that llama.cpp's `convert_hf_to_gguf.py` writes, the weights from its tensor names (`blk.N.attn_q.weight`, ...)
dequantized to the requested dtype (`gguf_quant.py`), with the converter's Q/K row permutation undone for Llama
and Mistral (Qwen2 uses NeoX-style rope in llama.cpp, stored unpermuted). The tokenizer is `gguf_tokenizer.py`'s.

Architectures: llama (which llama.cpp also writes for Mistral checkpoints), mistral, qwen2.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader

from longreach.config import ModelConfig
from longreach.model.gguf_quant import check_type, dequantize, type_name, unpermute_rows
from longreach.model.llama import LlamaForCausalLM
from longreach.model.safetensors_io import assign_checked

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-dimension rope divisors (Llama 3.1 scaling)
GGUF_MAGIC = b"GGUF"

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# the inverse, for writers (tests, tools)
HF_TO_GGUF = {hf: gguf for gguf, hf in _GLOBAL_TENSORS.items()}


class GGUFError(ValueError):
    """A GGUF file this reader cannot use: unreadable, truncated, or an unsupported architecture."""


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a file starting with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


class GGUFFile:
    """An opened GGUF file: its metadata as Python values and its tensors by name.

    Opening checks the magic, the header and that every tensor's bytes lie inside the file, so a truncated
    download fails here with its path, not later with a numpy error.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self.reader = GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
            raise GGUFError(
                f"{self.path}: cannot read the GGUF header ({type(exc).__name__}: {exc}); "
                f"the file ({size} bytes) is truncated or corrupt"
            ) from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} ends at byte {end} but the file has {size} bytes: "
                    "the file is truncated"
                )
        self.architecture = str(self.get("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def arch(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}`."""
        return self.get(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.arch(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {self.architecture}.{key!r} is missing")
        return value

    @property
    def model_type(self) -> str:
        """The Hugging Face model_type: llama.cpp writes Mistral checkpoints as 'llama'."""
        if self.architecture != "llama":
            return self.architecture
        names = " ".join(str(self.get(k, "")) for k in ("general.name", "general.basename")).lower()
        if "mistral" in names or self.arch("attention.sliding_window") is not None:
            return "mistral"
        return "llama"


def _rope_scaling(g: GGUFFile) -> dict[str, Any] | None:
    """The HF rope_scaling dict from `{arch}.rope.scaling.*`; None for plain rope."""
    if ROPE_FREQS in g.tensors:
        return _llama3_scaling(g)
    kind = g.arch("rope.scaling.type")
    factor = g.arch("rope.scaling.factor")
    if kind in (None, "none"):
        return None
    original = g.arch("rope.scaling.original_context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)} if factor not in (None, 1.0) else None
    if kind == "yarn" and factor is not None:
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if g.arch(f"rope.scaling.{key}") is not None:
                scaling[hf_key] = float(g.arch(f"rope.scaling.{key}"))
        return scaling
    raise GGUFError(
        f"{g.path}: unsupported rope scaling type {kind!r} ({g.architecture}.rope.scaling.type); "
        "supported: none, linear, yarn"
    )


def _llama3_factors(wavelen: torch.Tensor, factor: float, low: float, high: float, original: float):
    """The per-dimension divisors llama.cpp's converter writes for Llama 3.1 scaling (its rope_freqs.weight)."""
    smooth = (original / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen > original / low, torch.full_like(wavelen, factor), medium)
    return torch.where(wavelen < original / high, torch.ones_like(wavelen), out)


def _llama3_scaling(g: GGUFFile) -> dict[str, Any] | None:
    """Llama 3.1-style scaling stored as per-dimension divisors (`rope_freqs.weight`) -> HF's llama3 parameters.

    The factor is the largest divisor; the original length is the metadata's or llama.cpp's default 8192; the
    low/high frequency factors are fitted to the smooth band (1/f = (1-s)/factor + s, s linear in 1/wavelength),
    or llama.cpp's defaults 1 and 4 when the band has fewer than two dimensions. The parameters must reproduce
    every stored divisor, else the file is refused naming the tensor."""
    factors = dequantize(g.tensors[ROPE_FREQS]).double()
    dim = 2 * factors.numel()
    inv_freq = 1.0 / float(g.arch("rope.freq_base") or 10000.0) ** (torch.arange(0, dim, 2).double() / dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    original = float(g.arch("rope.scaling.original_context_length") or 8192)
    low, high = 1.0, 4.0
    band = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if int(band.sum()) >= 2:
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)  # s = (original / wavelen - low) * k
        x = original / wavelen[band]
        k = float((smooth[-1] - smooth[0]) / (x[-1] - x[0]))
        low = round(float(x[0] - smooth[0] / k), 6)
        high = round(low + 1 / k, 6)
    if (_llama3_factors(wavelen, factor, low, high, original) - factors).abs().max() > 1e-4 * factor:
        raise GGUFError(
            f"{g.path}: tensor {ROPE_FREQS!r} holds per-dimension rope factors that are not Llama 3.1 scaling; "
            "supported rope scaling: none, linear, yarn, llama3"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(original),
    }


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """A Hugging Face config.json dict for the model in `g`."""
    num_heads = int(g.require("attention.head_count"))
    hidden = int(g.require("embedding_length"))
    head_dim = g.arch("attention.key_length")
    if head_dim is None and g.architecture != "qwen2":  # llama/mistral rotate the whole head
        head_dim = g.arch("rope.dimension_count")
    embed = g.tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{g.path}: tensor 'token_embd.weight' is missing")
    vocab = g.arch("vocab_size") or int(embed.shape[1])
    model_type = g.model_type
    tokens = {name: g.get(f"tokenizer.ggml.{key}") for name, key in _TOKEN_IDS.items()}
    config = {
        "model_type": model_type,
        "hidden_act": "silu",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(g.require("feed_forward_length")),
        "num_hidden_layers": int(g.require("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(g.arch("attention.head_count_kv") or num_heads),
        "head_dim": int(head_dim or hidden // num_heads),
        "max_position_embeddings": int(g.arch("context_length") or 2048),
        "rms_norm_eps": float(g.require("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g.arch("rope.freq_base") or 10000.0),
        "rope_scaling": _rope_scaling(g),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        **{name: int(value) for name, value in tokens.items() if value is not None},
    }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    elif model_type == "mistral":
        window = g.arch("attention.sliding_window")
        config["sliding_window"] = int(window) if window else None
    else:  # qwen2: llama.cpp applies no sliding window to it
        config["use_sliding_window"] = False
    return config


_TOKEN_IDS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "padding_token_id",
}


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[2] in _LAYER_TENSORS
        and parts[3] in ("weight", "bias")
    ):
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def state_dict(
    g: GGUFFile,
    config: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name, dequantized to `dtype`, Q/K rows in HF order."""
    unknown = [t for t in g.tensors if _hf_name(t) is None and t != ROPE_FREQS]
    if unknown:
        raise GGUFError(
            f"{g.path}: tensor(s) {unknown[:5]} have no place in a {config['model_type']} model "
            "(expected token_embd, output_norm, output and blk.N.{attn,ffn}_*)"
        )
    for tensor in g.tensors.values():
        check_type(tensor)
    permuted = g.architecture == "llama" or g.architecture == "mistral"
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for name, tensor in g.tensors.items():
        if name == ROPE_FREQS:  # read into the config (`_llama3_scaling`)
            continue
        try:
            value = dequantize(tensor, torch.float32)
        except ValueError as exc:
            raise GGUFError(f"{g.path}: {exc}") from None
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if permuted and kind in heads:
            value = unpermute_rows(value, heads[kind])
        state[_hf_name(name)] = value.to(device=device, dtype=dtype)
    return state


def describe_types(g: GGUFFile) -> dict[str, int]:
    """Tensor type name -> count, e.g. {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}."""
    counts: dict[str, int] = {}
    for tensor in g.tensors.values():
        counts[type_name(tensor)] = counts.get(type_name(tensor), 0) + 1
    return counts


def generation_config(g: GGUFFile) -> dict[str, Any] | None:
    """generation_config.json contents when the metadata names the special tokens, else None."""
    ids = {name: g.get(f"tokenizer.ggml.{key}") for name, key in _TOKEN_IDS.items()}
    if ids["bos_token_id"] is None and ids["eos_token_id"] is None:
        return None
    return {name: int(value) for name, value in ids.items() if value is not None}


def default_dtype(g: GGUFFile) -> torch.dtype:
    """The dtype a GGUF loads in when none is asked: F16/BF16 when every matrix is stored so, else fp32
    (dequantized values are exact in fp32, not in 16 bits)."""
    kinds = {type_name(t) for t in g.tensors.values() if len(t.shape) > 1}
    return {frozenset({"F16"}): torch.float16, frozenset({"BF16"}): torch.bfloat16}.get(
        frozenset(kinds), torch.float32
    )


def load_gguf_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    rope_scaling: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """Our model from a GGUF file. dtype None: see `default_dtype`; rope_scaling replaces the file's."""
    g = GGUFFile(path)
    config = hf_config(g)
    cfg = ModelConfig.from_hf_dict(config, rope_scaling=rope_scaling)
    state = state_dict(g, config, dtype or default_dtype(g), device)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assign_checked(model, state, f"GGUF file {str(g.path)!r}")
    return model.eval()
