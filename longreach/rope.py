"""Rotary position embeddings and every way of stretching them to longer contexts.

One function per rope type returns `(inv_freq, attention_factor)`, following Hugging Face
transformers' `modeling_rope_utils` (5.x) so real checkpoints reproduce exactly:

- default: inv_freq_i = 1 / theta^(2i/d)
- linear: Position Interpolation (Chen et al. 2023), inv_freq / factor
- dynamic: dynamic NTK, base grows with the current sequence length
- ntk: static NTK-aware base scaling, base' = base * s^(d/(d-2)) (Code Llama's route; ours, not in transformers)
- yarn: NTK-by-parts interpolation + attention temperature (Peng et al. 2023, arXiv 2309.00071)
- llama3: Llama 3.1's wavelength-banded scaling
- longrope: per-dimension rescale factors, short set up to the original length, long set beyond (Phi-3)

The model multiplies cos and sin by `attention_factor`, so q.k scales by its square. Tables are fp32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

# rope_type -> (required keys, optional keys) of the scaling dict, beyond rope_type/rope_theta/partial_rotary_factor
ROPE_KEYS: dict[str, tuple[frozenset, frozenset]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "ntk": (frozenset({"factor"}), frozenset()),
    "yarn": (
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "llama3": (
        frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
        frozenset(),
    ),
    "longrope": (
        frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
        frozenset({"factor", "attention_factor"}),
    ),
}
# keys every dict may carry; transformers also writes some bookkeeping keys we accept and ignore
_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_IGNORED_KEYS = frozenset({"max_position_embeddings"})
_NEEDS_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    """Everything RoPE needs. `scaling` holds the type-specific keys (factor, beta_fast, ...)."""

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    scaling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.rope_type not in ROPE_FUNCTIONS:
            raise ValueError(f"unknown rope_type {self.rope_type!r}; supported: {sorted(ROPE_FUNCTIONS)}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")
        if self.theta <= 0:
            raise ValueError(f"rope_theta={self.theta} must be positive")
        required, optional = ROPE_KEYS[self.rope_type]
        missing = sorted(required - set(self.scaling))
        if missing:
            raise ValueError(
                f"rope_type {self.rope_type!r} needs {missing} (got keys {sorted(self.scaling)})"
            )
        unknown = sorted(set(self.scaling) - required - optional - _IGNORED_KEYS)
        if unknown:  # transformers loads such checkpoints with a warning, so we do too (and keep the keys)
            warnings.warn(
                f"rope_type {self.rope_type!r} ignores unknown keys {unknown}; "
                f"required {sorted(required)}, optional {sorted(optional)}",
                stacklevel=2,
            )
        factor = self.scaling.get("factor")
        if factor is not None and (not isinstance(factor, (int, float)) or factor < 1):
            if not (self.rope_type == "longrope"):
                raise ValueError(f"rope_type {self.rope_type!r}: factor={factor!r} must be a number >= 1")
        if self.rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(self.scaling[key]) != self.rotary_dim // 2:
                    raise ValueError(
                        f"longrope {key} has {len(self.scaling[key])} entries; "
                        f"expected rotary_dim/2 = {self.rotary_dim // 2}"
                    )
        if self.rope_type == "llama3":
            low, high = self.scaling["low_freq_factor"], self.scaling["high_freq_factor"]
            if not high > low:
                raise ValueError(f"llama3 needs high_freq_factor > low_freq_factor (got {high} and {low})")
        if self.rope_type == "yarn":
            expected = self.max_position_embeddings / self.scaling["original_max_position_embeddings"]
            if factor is not None and not math.isclose(factor, expected) and expected != 1:
                warnings.warn(
                    f"yarn factor={factor} differs from max_position_embeddings / "
                    f"original_max_position_embeddings = {expected:g}; using factor={factor}",
                    stacklevel=2,
                )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def original_max_position_embeddings(self) -> int:
        return int(self.scaling.get("original_max_position_embeddings", self.max_position_embeddings))

    @property
    def is_length_dependent(self) -> bool:
        """True when inv_freq depends on the current sequence length (dynamic NTK, longrope)."""
        return self.rope_type in ("dynamic", "longrope")

    def table_length(self, seq_len: int) -> int | None:
        """The length whose tables a sequence of `seq_len` positions uses: equal results mean equal tables
        (None for types that do not depend on length). LongRoPE has two tables (short up to the original
        length, long beyond); dynamic NTK's base is fixed up to max_position_embeddings, then grows."""
        if self.rope_type == "longrope":
            original = self.original_max_position_embeddings
            return original + 1 if seq_len > original else original
        if self.rope_type == "dynamic":
            return max(seq_len, self.max_position_embeddings)
        return None

    @property
    def max_supported_length(self) -> int:
        """The longest context this rope is meant for, derived as vLLM derives max_model_len: the checkpoint's
        max_position_embeddings, or factor x the original length for a scaling that extends it."""
        factor, max_pos = self.scaling.get("factor"), self.max_position_embeddings
        if self.rope_type in ("linear", "dynamic", "ntk"):
            return int(max_pos * factor)
        if self.rope_type in ("yarn", "llama3"):
            return max(max_pos, int(self.original_max_position_embeddings * factor))
        if self.rope_type == "longrope" and factor:
            return max(max_pos, int(self.original_max_position_embeddings * factor))
        return max_pos

    def to_hf_dict(self) -> dict[str, Any]:
        """The 5.x `rope_parameters` dict (rope_theta inside)."""
        out = {"rope_type": self.rope_type, "rope_theta": self.theta, **self.scaling}
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out


def rope_config_from_hf(config: dict[str, Any], rope_scaling: dict[str, Any] | None = None) -> RopeConfig:
    """Build a RopeConfig from a Hugging Face config.json dict (4.x `rope_scaling` or 5.x `rope_parameters`).

    `rope_scaling`, when given, replaces the checkpoint's scaling (same dict format; its own
    `rope_theta` wins, else the checkpoint's theta is kept).
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    max_pos = int(config.get("max_position_embeddings", 2048))
    params = dict(config.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"per-layer rope_parameters (keys {sorted(params)}) are not supported by Llama-family models"
        )
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or {})
    scaling = {**params, **scaling} if scaling else params
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise ValueError(
                f"rope_scaling must be a dict, got {type(rope_scaling).__name__}: {rope_scaling!r}"
            )
        scaling = dict(rope_scaling)
        theta = scaling.pop("rope_theta", theta)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    partial = scaling.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    scaling.pop("rope_theta", None)
    if rope_type in _NEEDS_ORIGINAL_LENGTH:
        if config.get(
            "original_max_position_embeddings"
        ):  # Phi-3 keeps it at the top level, and it wins there
            scaling["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_pos)
    scaling = {k: v for k, v in scaling.items() if v is not None}
    return RopeConfig(
        head_dim=head_dim,
        theta=float(theta),
        rope_type=rope_type,
        partial_rotary_factor=float(partial),
        max_position_embeddings=max_pos,
        scaling=scaling,
    )


def parse_rope_scaling_arg(text: str | None) -> dict[str, Any] | None:
    """A `--rope-scaling` command-line value: a JSON object, or none/null/empty for the checkpoint's own rope."""
    if text is None or text.strip().lower() in ("none", "null", ""):
        return None
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--rope-scaling is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--rope-scaling must be a JSON object or 'none', got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------- rope types


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def default_rope(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(cfg.theta, cfg.rotary_dim), 1.0


def linear_rope(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Position Interpolation: positions squeezed by `factor` into the trained range."""
    return _base_inv_freq(cfg.theta, cfg.rotary_dim) / cfg.scaling["factor"], 1.0


def dynamic_ntk_rope(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: the base grows with the current length once it passes max_position_embeddings."""
    dim, factor, max_pos = cfg.rotary_dim, cfg.scaling["factor"], cfg.max_position_embeddings
    seq_len = max(seq_len or max_pos, max_pos)
    base = cfg.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def static_ntk_rope(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """NTK-aware base scaling (bloc97): base' = base * s^(d/(d-2)); high frequencies barely move."""
    dim = cfg.rotary_dim
    return _base_inv_freq(cfg.theta * cfg.scaling["factor"] ** (dim / (dim - 2)), dim), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_rope(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; temperature via attention_factor."""
    s = cfg.scaling
    dim, base, factor = cfg.rotary_dim, cfg.theta, s["factor"]
    original = s["original_max_position_embeddings"]
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(
        num_rotations: float,
    ) -> float:  # the dimension that turns num_rotations times over `original`
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the dimension keeps its trained frequency
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def llama3_rope(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth band between."""
    s = cfg.scaling
    factor, low_ff, high_ff, original = (
        s["factor"],
        s["low_freq_factor"],
        s["high_freq_factor"],
        s["original_max_position_embeddings"],
    )
    inv_freq = _base_inv_freq(cfg.theta, cfg.rotary_dim)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low_ff, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < original / high_ff) & ~(wavelen > original / low_ff)
    return torch.where(is_medium, smoothed, scaled), 1.0


def longrope_rope(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-dimension factors, `long_factor` once the sequence passes the original length."""
    s = cfg.scaling
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(
        s["long_factor"] if seq_len and seq_len > original else s["short_factor"], dtype=torch.float32
    )
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (ext * cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, float(attention_factor)


ROPE_FUNCTIONS: dict[str, Callable[[RopeConfig, int | None], tuple[torch.Tensor, float]]] = {
    "default": default_rope,
    "linear": linear_rope,
    "dynamic": dynamic_ntk_rope,
    "ntk": static_ntk_rope,
    "yarn": yarn_rope,
    "llama3": llama3_rope,
    "longrope": longrope_rope,
}


def compute_inv_freq(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (rotary_dim/2,) fp32, attention_factor) for this config at the current sequence length."""
    return ROPE_FUNCTIONS[cfg.rope_type](cfg, seq_len)


# ---------------------------------------------------------------------------------------------- application


class RotaryEmbedding(nn.Module):
    """cos/sin tables for a flat batch of positions.

    For length-dependent types (dynamic NTK, longrope) the frequencies follow `seq_len`: one length for the
    whole call (default max(positions)+1, what transformers does per forward), or a (T,) tensor giving each
    token its own request's length, so that a serving engine keeps every request's tables fixed whatever it
    is batched or chunked with (docs/serving.md, "RoPE that depends on length").
    """

    def __init__(self, cfg: RopeConfig):
        super().__init__()
        self.cfg = cfg
        # a plain attribute, not a buffer: the model is built on the meta device and this must stay real
        with torch.device("cpu"):
            self._inv_freq, self.attention_factor = compute_inv_freq(cfg)
        self._inv_freq_on: dict[tuple[torch.device, int | None], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, seq_len: int | None = None) -> torch.Tensor:
        length = (
            self.cfg.table_length(seq_len) if self.cfg.is_length_dependent and seq_len is not None else None
        )
        key = (device, length)
        if key not in self._inv_freq_on:
            if len(self._inv_freq_on) > 256:  # dynamic NTK: one table per distinct length; keep it bounded
                self._inv_freq_on.clear()
            table = self._inv_freq if length is None else compute_inv_freq(self.cfg, length)[0]
            self._inv_freq_on[key] = table.to(device)
        return self._inv_freq_on[key]

    def forward(
        self, positions: torch.Tensor, seq_len: int | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) long -> cos, sin: (T, rotary_dim/2) fp32, already scaled by attention_factor.

        seq_len: the sequence length the frequencies are chosen for: an int for every token (default
        max(positions)+1), or a (T,) int tensor of per-token lengths. Ignored by length-independent types.
        """
        pos = positions.to(torch.float32)[:, None]
        if not self.cfg.is_length_dependent:
            freqs = pos * self.inv_freq(positions.device)[None, :]  # (T, rotary_dim/2)
        elif isinstance(seq_len, torch.Tensor):
            lengths, which = torch.unique(seq_len, return_inverse=True)  # (U,), (T,)
            tables = torch.stack(
                [self.inv_freq(positions.device, int(n)) for n in lengths.tolist()]
            )  # (U, r/2)
            freqs = pos * tables[which]
        else:
            if seq_len is None:
                seq_len = int(positions.max()) + 1 if positions.numel() else 0
            freqs = pos * self.inv_freq(positions.device, seq_len)[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (T, H, D) in the half-split (GPT-NeoX / HF) layout."""
    rotary_dim = cos.shape[-1] * 2
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)  # (T, H, rotary_dim/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, rotary_dim/2)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, rest), dim=-1) if rest.numel() else rotated
