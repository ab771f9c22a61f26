"""KV-cache size and prefill cost of a decoder-only transformer: the `longreach kv-size` verb.

Memory follows the usual accounting (vLLM, the GQA paper): every layer stores one key and one value
vector per KV head per token, so

    KV bytes/token = 2 * num_layers * num_kv_heads * head_dim * bytes_per_value   (+ quantization scales)

Llama-3.1-70B (80 layers, 8 KV heads, head_dim 128) needs 320 KiB/token in bf16, i.e. 40.0 GiB for one
131,072-token request; with one KV head per query head (no GQA, 64 heads) it would need 320 GiB.
Every layer is assumed to keep the full context (no sliding window, no eviction).

KV dtypes and their scale overhead (kept separate from the data so the cost of a scheme is visible):

- bf16 / fp16: 2 bytes per value, no scales.
- fp8 (e4m3): 1 byte per value; one scale per tensor, counted as zero.
- int8: 1 byte per value + one fp16 scale per (token, KV head) for K and for V (symmetric, per-token).
- int4: 0.5 byte per value, asymmetric, group size 32 with an fp16 scale and an fp16 zero point per group
  (KIVI, arXiv 2402.02750: keys grouped per channel along 32 tokens, values per token along 32 channels).
  Either way there are values/32 groups, i.e. 4 bytes per 32 values; a key group spans 32 tokens, so the
  per-token figure is amortized. KIVI's full-precision window of recent tokens (128) is not counted.

Prefill compute per request of N tokens (forward only; the usual 2-FLOPs-per-multiply-add rule):

    dense     = 2 * num_params_nonembedding * N        (attention projections, SwiGLU MLP, norms)
    lm_head   = 2 * hidden_size * vocab_size * N       (counted for every position, an upper bound:
                                                         a server computes logits only for the last one)
    attention = 4 * num_layers * num_attention_heads * head_dim * N^2 / 2
                                                        (QK^T and PV, halved by the causal mask)
    GPU-seconds = FLOPs / (peak_flops * mfu);  $ = GPU-seconds * price_per_gpu_hour / 3600
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

KiB = 1024
GiB = 1024**3

DEFAULT_CONTEXT = 128 * 1024
DEFAULT_GPU_PRICE_PER_HOUR = 3.0  # $/GPU-hour, a typical on-demand H100 rate
DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense (no sparsity)

INT4_GROUP_SIZE = 32
_FP16_BYTES = 2


@dataclass(frozen=True)
class ArchSpec:
    """The shape numbers of a Llama-family decoder (GQA attention, SwiGLU MLP, RMSNorm)."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    name: str = "custom"

    def __post_init__(self):
        for field_name in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                           "hidden_size", "intermediate_size", "vocab_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.name}: {field_name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_attention_heads={self.num_attention_heads} must be a multiple "
                             f"of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None) -> "ArchSpec":
        """Build from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2 and alike).

        `head_dim` defaults to hidden_size // num_attention_heads, `num_key_value_heads` to
        num_attention_heads (plain multi-head attention). A multimodal config's `text_config` is used
        when the top level has no layer count.
        """
        if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        name = name or config.get("_name_or_path") or config.get("model_type") or "custom"
        missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size",
                               "intermediate_size", "vocab_size") if config.get(k) is None]
        if missing:
            raise ValueError(f"{name}: config is missing {missing}; need num_hidden_layers, num_attention_heads, "
                             "hidden_size, intermediate_size and vocab_size")
        num_heads = config["num_attention_heads"]
        hidden_size = config["hidden_size"]
        head_dim = config.get("head_dim")
        num_kv_heads = config.get("num_key_value_heads")
        return cls(
            num_layers=config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
            head_dim=hidden_size // num_heads if head_dim is None else head_dim,
            hidden_size=hidden_size,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            name=name,
        )

    def without_gqa(self) -> "ArchSpec":
        """The same model with one KV head per query head (multi-head attention)."""
        return replace(self, num_kv_heads=self.num_attention_heads)


# Numbers from each model's config.json on the Hugging Face Hub.
PRESETS: dict[str, ArchSpec] = {
    spec.name: spec for spec in (
        ArchSpec(32, 32, 8, 128, 4096, 14336, 128256, "meta-llama/Llama-3.1-8B"),
        ArchSpec(80, 64, 8, 128, 8192, 28672, 128256, "meta-llama/Llama-3.1-70B"),
        ArchSpec(126, 128, 8, 128, 16384, 53248, 128256, "meta-llama/Llama-3.1-405B"),
        ArchSpec(32, 32, 8, 128, 4096, 14336, 32000, "mistralai/Mistral-7B-v0.1"),
        ArchSpec(28, 28, 4, 128, 3584, 18944, 152064, "Qwen/Qwen2.5-7B"),
        ArchSpec(80, 64, 8, 128, 8192, 29568, 152064, "Qwen/Qwen2.5-72B"),
    )
}
# extra look-up keys (already normalized) -> preset name; same shapes as the preset
_ALIASES = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-v0.2": "mistralai/Mistral-7B-v0.1",  # v0.2 changed rope/window, not the shapes
}


def _lookup_key(name: str) -> str:
    """'meta-llama/Meta-Llama-3.1-70B-Instruct' -> 'llama-3.1-70b' (organisation, 'meta-', '-instruct' dropped)."""
    key = name.strip().rsplit("/", 1)[-1].lower()
    key = key.removeprefix("meta-")
    return key.replace("-instruct", "")


_PRESET_KEYS = {_lookup_key(name): name for name in PRESETS} | _ALIASES


def resolve_arch(name_or_dir: str | Path) -> ArchSpec:
    """A checkpoint directory (or its config.json) or a preset name such as 'Llama-3.1-70B'.

    Preset names match Hugging Face repo names case-insensitively, with or without the organisation,
    with or without '-Instruct' and the older 'Meta-' prefix.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir() or path.name == "config.json":
        config_path = path / "config.json" if path.is_dir() else path
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.json there; give a checkpoint directory holding a "
                                    f"Hugging Face config.json or one of the presets: {', '.join(PRESETS)}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
        return ArchSpec.from_hf_config(config, name=str(path if path.is_dir() else path.parent))
    preset = _PRESET_KEYS.get(_lookup_key(str(name_or_dir)))
    if preset is None:
        raise ValueError(f"unknown model {str(name_or_dir)!r}: not a directory with a config.json and not a preset; "
                         f"presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


_LENGTH_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*$")
_LENGTH_UNITS = {"": 1, "k": 1024, "m": 1024**2}


def parse_length(text: str | int) -> int:
    """'131072' | '128k' | '1M' | '1.5k' -> tokens; k = 1024, M = 1024**2; must be a positive whole number."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        match = _LENGTH_RE.match(str(text))
        if match is None:
            raise ValueError(f"bad length {text!r}: expected a positive number of tokens with an optional "
                             "suffix k (x1024) or M (x1024**2), e.g. 131072, 128k, 1M, 1.5k")
        value = float(match.group(1)) * _LENGTH_UNITS[match.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"bad length {text!r}: must be a whole number of tokens >= 1 (got {value:g})")
    return int(value)


# KV dtype -> bits per stored value
KV_DTYPES: dict[str, int] = {"bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}


def _check_dtype(dtype: str) -> None:
    if dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV dtype {dtype!r}; supported: {', '.join(KV_DTYPES)}")


def kv_bytes_per_token(arch: ArchSpec, dtype: str = "bf16") -> tuple[float, float]:
    """(data_bytes, scale_bytes) of K and V for one token across all layers (scheme in the module docstring)."""
    _check_dtype(dtype)
    num_values = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim  # K and V
    data_bytes = num_values * KV_DTYPES[dtype] / 8
    if dtype == "int8":
        scale_bytes = 2 * arch.num_layers * arch.num_kv_heads * _FP16_BYTES  # one scale per (token, head), K and V
    elif dtype == "int4":
        scale_bytes = num_values / INT4_GROUP_SIZE * 2 * _FP16_BYTES  # scale + zero point per group of 32
    else:
        scale_bytes = 0.0
    return data_bytes, scale_bytes


def kv_bytes_per_request(arch: ArchSpec, context_len: int, dtype: str = "bf16") -> tuple[float, float]:
    """(data_bytes, scale_bytes) of one request holding `context_len` tokens."""
    data_bytes, scale_bytes = kv_bytes_per_token(arch, dtype)
    return data_bytes * context_len, scale_bytes * context_len


def kv_bytes_per_request_without_gqa(arch: ArchSpec, context_len: int, dtype: str = "bf16") -> tuple[float, float]:
    """As `kv_bytes_per_request` with num_kv_heads = num_attention_heads."""
    return kv_bytes_per_request(arch.without_gqa(), context_len, dtype)


def num_params(arch: ArchSpec, include_embeddings: bool = True) -> int:
    """Parameter count: q/k/v/o projections (no biases), SwiGLU MLP, two RMSNorms per layer, final norm,
    plus untied input embedding and lm head when `include_embeddings`."""
    attention = arch.hidden_size * arch.head_dim * (2 * arch.num_attention_heads + 2 * arch.num_kv_heads)
    mlp = 3 * arch.hidden_size * arch.intermediate_size
    per_layer = attention + mlp + 2 * arch.hidden_size
    total = arch.num_layers * per_layer + arch.hidden_size
    if include_embeddings:
        total += 2 * arch.vocab_size * arch.hidden_size
    return total


def prefill_flops(arch: ArchSpec, num_tokens: int) -> dict[str, float]:
    """Forward FLOPs to prefill one request of `num_tokens` tokens, by term (formulas in the module docstring)."""
    dense = 2.0 * num_params(arch, include_embeddings=False) * num_tokens
    lm_head = 2.0 * arch.hidden_size * arch.vocab_size * num_tokens
    attention = 4.0 * arch.num_layers * arch.num_attention_heads * arch.head_dim * num_tokens**2 / 2
    return {"dense": dense, "lm_head": lm_head, "attention": attention, "total": dense + lm_head + attention}


def prefill_cost(flops: float, peak_tflops: float = DEFAULT_PEAK_TFLOPS, mfu: float = DEFAULT_MFU,
                 gpu_price_per_hour: float = DEFAULT_GPU_PRICE_PER_HOUR) -> tuple[float, float]:
    """(GPU-seconds, dollars) to run `flops` at `mfu` of `peak_tflops`, priced per GPU-hour."""
    gpu_seconds = flops / (peak_tflops * 1e12 * mfu)
    return gpu_seconds, gpu_seconds * gpu_price_per_hour / 3600


def report(arch: ArchSpec, context_len: int, dtypes: list[str] | None = None, batch: int = 1,
           peak_tflops: float = DEFAULT_PEAK_TFLOPS, mfu: float = DEFAULT_MFU,
           gpu_price_per_hour: float = DEFAULT_GPU_PRICE_PER_HOUR) -> dict[str, Any]:
    """Everything `kv-size` prints, as plain data (bytes, FLOPs, seconds, dollars)."""
    for label, value, ok, accepted in (("context_len", context_len, isinstance(context_len, int) and context_len >= 1,
                                        "an integer >= 1"),
                                       ("batch", batch, isinstance(batch, int) and batch >= 1, "an integer >= 1"),
                                       ("peak_tflops", peak_tflops, peak_tflops > 0, "> 0"),
                                       ("mfu", mfu, 0 < mfu <= 1, "in (0, 1]"),
                                       ("gpu_price_per_hour", gpu_price_per_hour, gpu_price_per_hour >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"{label}={value!r} must be {accepted}")
    rows = []
    for dtype in dtypes or list(KV_DTYPES):
        data_per_token, scale_per_token = kv_bytes_per_token(arch, dtype)
        data, scales = kv_bytes_per_request(arch, context_len, dtype)
        mha_data, mha_scales = kv_bytes_per_request_without_gqa(arch, context_len, dtype)
        rows.append({
            "dtype": dtype,
            "data_bytes_per_token": data_per_token,
            "scale_bytes_per_token": scale_per_token,
            "data_bytes_per_request": data,
            "scale_bytes_per_request": scales,
            "total_bytes_per_request": data + scales,
            "total_bytes_without_gqa": mha_data + mha_scales,
            "total_bytes_batch": (data + scales) * batch,
        })
    flops = prefill_flops(arch, context_len)
    gpu_seconds, dollars = prefill_cost(flops["total"], peak_tflops, mfu, gpu_price_per_hour)
    return {
        "arch": asdict(arch),
        "num_params": num_params(arch),
        "num_params_nonembedding": num_params(arch, include_embeddings=False),
        "context_len": context_len,
        "batch": batch,
        "kv": rows,
        "prefill": {
            "flops_per_request": flops,
            "peak_tflops": peak_tflops,
            "mfu": mfu,
            "gpu_price_per_hour": gpu_price_per_hour,
            "gpu_seconds_per_request": gpu_seconds,
            "dollars_per_request": dollars,
            "gpu_seconds_batch": gpu_seconds * batch,
            "dollars_batch": dollars * batch,
        },
    }


def format_report(rep: dict[str, Any]) -> str:
    """The human-readable table of `report`."""
    arch, n, batch = rep["arch"], rep["context_len"], rep["batch"]
    ratio = arch["num_attention_heads"] // arch["num_kv_heads"]
    lines = [
        f"{arch['name']}: {arch['num_layers']} layers, {arch['num_attention_heads']} query heads, "
        f"{arch['num_kv_heads']} KV heads (GQA {ratio}:1), head_dim {arch['head_dim']}, "
        f"{rep['num_params'] / 1e9:.2f}B params",
        f"KV cache for one request of {n:,} tokens" + (f" (x{batch} concurrent requests in the last column)"
                                                         if batch > 1 else ""),
        "",
    ]
    header = ["dtype", "KiB/token", "+scales B/token", "data GiB", "scales GiB", "total GiB", "no-GQA GiB"]
    if batch > 1:
        header.append(f"x{batch} GiB")
    table = [header]
    for row in rep["kv"]:
        cells = [row["dtype"], f"{row['data_bytes_per_token'] / KiB:,.1f}", f"{row['scale_bytes_per_token']:,.0f}",
                 f"{row['data_bytes_per_request'] / GiB:,.1f}", f"{row['scale_bytes_per_request'] / GiB:,.2f}",
                 f"{row['total_bytes_per_request'] / GiB:,.1f}", f"{row['total_bytes_without_gqa'] / GiB:,.1f}"]
        if batch > 1:
            cells.append(f"{row['total_bytes_batch'] / GiB:,.1f}")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    pre = rep["prefill"]
    flops = pre["flops_per_request"]
    lines += [
        "",
        "scales: int8 = fp16 per (token, KV head) for K and V; "
        f"int4 = fp16 scale + zero per group of {INT4_GROUP_SIZE} (KIVI);",
        "        fp8 per-tensor scale not counted. no-GQA = total with one KV head per query head.",
        "",
        f"Prefill compute per request (forward FLOPs, N = {n:,} tokens):",
        *(f"  {label:<10} {formula:<48} = {flops[key]:.3e}" for key, label, formula in (
            ("dense", "dense", f"2 * {rep['num_params_nonembedding'] / 1e9:.2f}B non-embedding params * N"),
            ("lm_head", "lm head", "2 * hidden * vocab * N"),
            ("attention", "attention", "4 * layers * heads * head_dim * N^2 / 2 (causal)"),
            ("total", "total", ""))),
        f"  at {pre['mfu']:.0%} MFU of {pre['peak_tflops']:g} TFLOP/s: {pre['gpu_seconds_per_request']:,.1f} "
        f"GPU-seconds, ${pre['dollars_per_request']:,.4f} per request at ${pre['gpu_price_per_hour']:g}/GPU-hour",
    ]
    if batch > 1:
        lines.append(f"  {batch} requests: {pre['gpu_seconds_batch']:,.1f} GPU-seconds, ${pre['dollars_batch']:,.4f}")
    return "\n".join(lines)


def _length_arg(text: str) -> int:
    try:
        return parse_length(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(name: str, upper: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value > 0 and (upper is None or value <= upper)):
            accepted = f"(0, {upper:g}]" if upper is not None else "> 0"
            raise argparse.ArgumentTypeError(f"bad {name} {text!r}: must be a number in {accepted}")
        return value
    return parse


def _batch_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"bad --batch {text!r}: must be an integer >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"checkpoint directory with a config.json, or a preset: {', '.join(PRESETS)} "
                                      "(case-insensitive, organisation optional)")
    parser.add_argument("--context", type=_length_arg, default=DEFAULT_CONTEXT,
                        help="tokens per request: 131072, 128k, 1M, 1.5k (k = 1024, M = 1024**2); default 128k")
    parser.add_argument("--batch", type=_batch_arg, default=1, help="concurrent requests (default 1)")
    parser.add_argument("--dtype", choices=list(KV_DTYPES), default=None,
                        help="show only this KV dtype (default: all)")
    parser.add_argument("--gpu-price-per-hour", type=_positive_float("--gpu-price-per-hour"),
                        default=DEFAULT_GPU_PRICE_PER_HOUR,
                        help=f"$ per GPU-hour (default {DEFAULT_GPU_PRICE_PER_HOUR:g}, a typical H100 rate)")
    parser.add_argument("--mfu", type=_positive_float("--mfu", 1.0), default=DEFAULT_MFU,
                        help=f"model FLOPs utilization in (0, 1] (default {DEFAULT_MFU:g})")
    parser.add_argument("--peak-tflops", type=_positive_float("--peak-tflops"), default=DEFAULT_PEAK_TFLOPS,
                        help=f"peak TFLOP/s of one GPU (default {DEFAULT_PEAK_TFLOPS:g}: H100 SXM bf16 dense)")
    parser.add_argument("--policy", action="append", default=None,
                        help="also show the bounded size under an eviction policy: window:4096, sinks:4096, "
                             "h2o:1024 (heavy = recent), h2o:heavy=512,recent=1536; repeat for one row each")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    parser.epilog = ("prefill FLOPs = 2 * non-embedding params * N + 2 * hidden * vocab * N "
                     "+ 4 * layers * heads * head_dim * N^2 / 2 (causal); "
                     "GPU-seconds = FLOPs / (peak * mfu); $ = GPU-seconds * price / 3600")


def main(args: argparse.Namespace) -> int:
    try:
        arch = resolve_arch(args.model)
    except (ValueError, FileNotFoundError) as exc:
        print(f"longreach kv-size: {exc}", file=sys.stderr)
        return 2
    rep = report(arch, args.context, [args.dtype] if args.dtype else None, args.batch,
                 args.peak_tflops, args.mfu, args.gpu_price_per_hour)
    text = None if args.json else format_report(rep)
    if getattr(args, "policy", None):
        from longreach.kvcache.spec_policies import format_policy_rows, policy_rows
        try:
            rep["policies"] = policy_rows(arch, args.context, [row["dtype"] for row in rep["kv"]], args.policy)
        except ValueError as exc:
            print(f"longreach kv-size: --policy: {exc}", file=sys.stderr)
            return 2
        text = None if args.json else text + "\n\n" + format_policy_rows(rep["policies"], args.context)
    print(json.dumps(rep, indent=2) if args.json else text)
    return 0
