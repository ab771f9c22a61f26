"""KV eviction policies: sliding window, attention sinks (StreamingLLM), heavy hitters (H2O) — one small protocol.

A policy decides, after a step, which of a sequence's cached tokens must stay; the engine frees every whole
block left without a kept token. Policies are pure: they see only what they are given (the sequence length,
the positions still cached, accumulated attention scores) and hold no engine state, so one object serves
every sequence of an engine. After each step the engine calls

    plan = policy.plan(num_tokens, block_size, held=held_positions, scores=scores)
    free(block_table[i] for i in plan.free_blocks);  held_positions = plan.keep;  scores = scores[plan.keep_index]

and attends the next queries over `held_positions` plus the step's new tokens. Between steps a sequence holds
at most `policy.max_kept_tokens(block_size)` tokens in at most `policy.max_held_blocks(block_size)` blocks, however long it
generates; during a step it also holds that step's new tokens.

Positions are NOT re-rotated. Keys are cached after RoPE at their original positions and keep that rotation;
a query at position p is rotated for p. So a query sees an evicted-around key at its true distance (which grows
past the window), unlike the StreamingLLM paper (Xiao et al. 2023, arXiv 2309.17453), which re-assigns
positions within the cache ("rolling" the rotation) so distances stay within the trained range. Ours keeps the
cache a plain subset of the full-attention cache: `window` is then exactly sliding-window attention with
FlashAttention's window_size=(W, 0) for single-token steps (the query plus the W tokens before it).
Within a multi-token step (prefill chunk), pass the same window_size to attention for the exact mask; eviction
alone bounds memory, not visibility inside the step.

- `none`: keep everything.
- `window` (W): keep the last W tokens.
- `sinks` (S, W): StreamingLLM's attention sinks: the first S tokens (default 4) plus the last W.
- `h2o` (heavy, recent): H2O (Zhang et al. 2023, arXiv 2306.14048): the last `recent` tokens plus the `heavy`
  held tokens with the largest accumulated attention (tokens before the recent window only; ties go to the
  earlier token). Scores are one per token of the sequence, summed over layers, heads and queries (the paper
  keeps one set per head and layer; one set per sequence lets every layer share a block table). Evicted tokens
  never return: only held tokens compete. `unit="block"` ranks whole blocks by their summed score and keeps
  heavy // block_size of them, so memory is exactly the budget; `unit="token"` (the paper's granularity) may
  pin up to one block per heavy token. Accumulate scores with `accumulate_attention` (`H2OPolicy.observe`),
  from attention probabilities or from `key_attention_mass` (fused kernels hide the probabilities).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

POLICIES = ("none", "window", "sinks", "h2o")
H2O_UNITS = ("token", "block")


@dataclass(frozen=True)
class EvictionPlan:
    """keep: (K,) int64 positions that stay cached, ascending; keep_index: (K,) their indices into `held`
    (to slice per-token state such as scores); free_blocks: logical block indices (into the block table) that
    held tokens before and hold none now, ascending."""

    keep: torch.Tensor
    keep_index: torch.Tensor
    free_blocks: tuple[int, ...]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def _check_held(num_tokens: int, held: torch.Tensor | None) -> torch.Tensor:
    _positive_int("num_tokens", num_tokens, 0)
    if held is None:
        return torch.arange(num_tokens)
    held = torch.as_tensor(held, dtype=torch.long).cpu()
    if held.dim() != 1:
        raise ValueError(f"held must be a 1-D tensor of positions, got shape {tuple(held.shape)}")
    if held.numel() and (
        held[0] < 0 or held[-1] >= num_tokens or (held.numel() > 1 and (held.diff() <= 0).any())
    ):
        raise ValueError(
            f"held positions must be strictly increasing in [0, {num_tokens}); "
            f"got first {held[0].item()}, last {held[-1].item()}"
        )
    return held


class EvictionPolicy(abc.ABC):
    """The protocol: `keep_mask` decides; `plan` turns the decision into kept positions and freeable blocks."""

    name = ""
    uses_attention_scores = False  # True: plan() wants each kept key's accumulated attention (H2O)

    def max_kept_tokens(self, block_size: int) -> int | None:
        """Most tokens a sequence keeps between steps; None means unbounded."""
        return None

    def max_held_blocks(self, block_size: int) -> int | None:
        """Most blocks a sequence holds between steps (the memory bound); None means unbounded."""
        return None

    @abc.abstractmethod
    def keep_mask(
        self, num_tokens: int, held: torch.Tensor, scores: torch.Tensor | None, block_size: int
    ) -> torch.Tensor:
        """(len(held),) bool: which held positions stay."""

    def plan(
        self,
        num_tokens: int,
        block_size: int,
        held: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> EvictionPlan:
        """Decide after a step. num_tokens: the sequence's length; held: (H,) positions still cached, ascending
        (None: all of [0, num_tokens)); scores: (H,) accumulated attention of the held tokens (h2o)."""
        _positive_int("block_size", block_size)
        held = _check_held(num_tokens, held)
        if scores is not None and scores.shape != held.shape:
            raise ValueError(
                f"scores has shape {tuple(scores.shape)}; it must match held {tuple(held.shape)}"
            )
        mask = self.keep_mask(num_tokens, held, scores, block_size)
        keep_index = mask.nonzero().flatten()
        keep = held[keep_index]
        freed = set((held // block_size).unique().tolist()) - set((keep // block_size).unique().tolist())
        return EvictionPlan(keep, keep_index, tuple(sorted(freed)))


class NoEviction(EvictionPolicy):
    name = "none"

    def keep_mask(self, num_tokens, held, scores, block_size):
        return torch.ones(held.shape, dtype=torch.bool)


class WindowPolicy(EvictionPolicy):
    """Keep the last `window` tokens."""

    name = "window"

    def __init__(self, window: int):
        self.window = _positive_int("window", window)

    def max_kept_tokens(self, block_size):
        return self.window

    def max_held_blocks(self, block_size):
        return math.ceil(self.window / block_size) + 1

    def keep_mask(self, num_tokens, held, scores, block_size):
        return held >= num_tokens - self.window


class SinksPolicy(EvictionPolicy):
    """StreamingLLM: keep the first `num_sinks` tokens and the last `window` tokens."""

    name = "sinks"

    def __init__(self, window: int, num_sinks: int = 4):
        self.window = _positive_int("window", window)
        self.num_sinks = _positive_int("num_sinks", num_sinks, 0)

    def max_kept_tokens(self, block_size):
        return self.num_sinks + self.window

    def max_held_blocks(self, block_size):
        return math.ceil(self.num_sinks / block_size) + math.ceil(self.window / block_size) + 1

    def keep_mask(self, num_tokens, held, scores, block_size):
        return (held < self.num_sinks) | (held >= num_tokens - self.window)


def accumulate_attention(scores: torch.Tensor | None, attention: torch.Tensor) -> torch.Tensor:
    """H2O's accumulation: scores (K0,) of the keys attended (K0 <= K; keys past K0 are new and start at 0)
    plus the attention mass each key received. attention: (K,) per-key mass or probabilities (..., K) whose
    last axis runs over the same keys, e.g. (Hq, Sq, K); summed over every other axis. Returns (K,) fp32."""
    if attention.dim() == 0:
        raise ValueError("attention must have a key axis (last dim); got a scalar")
    num_keys = attention.shape[-1]
    mass = attention.detach().float().reshape(-1, num_keys).sum(dim=0)  # (K,)
    if scores is None:
        return mass
    if scores.dim() != 1 or scores.shape[0] > num_keys:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected (K0,) with K0 <= {num_keys} keys")
    out = mass.clone()
    out[: scores.shape[0]] += scores.float().to(out.device)
    return out


def key_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention mass each key receives from the queries, summed over queries and heads (for H2O when the
    attention kernel does not return probabilities). q: (Sq, Hq, D); k: (K, Hkv, D) post-RoPE keys; positions:
    (Sq,) and (K,) original token positions (a key is visible to queries at or after its position). -> (K,) fp32."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    kh = k.float().repeat_interleave(num_heads // num_kv_heads, dim=1)  # (K, Hq, D)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kh) * scale  # (Hq, Sq, K)
    visible = key_positions[None, :] <= query_positions[:, None]  # (Sq, K)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=(0, 1))


class H2OPolicy(EvictionPolicy):
    """H2O: keep the last `recent` tokens plus `heavy` heavy hitters by accumulated attention."""

    name = "h2o"
    uses_attention_scores = True

    def __init__(self, heavy: int, recent: int, unit: str = "token"):
        self.heavy = _positive_int("heavy", heavy, 0)
        self.recent = _positive_int("recent", recent)
        if unit not in H2O_UNITS:
            raise ValueError(f"unknown h2o unit {unit!r}; choose one of {list(H2O_UNITS)}")
        self.unit = unit

    @classmethod
    def from_ratio(
        cls, context_len: int, heavy_ratio: float = 0.1, recent_ratio: float = 0.1, unit: str = "token"
    ) -> "H2OPolicy":
        """Budgets as fractions of a context length (the paper's 10% heavy + 10% recent)."""
        _positive_int("context_len", context_len)
        for name, ratio in (("heavy_ratio", heavy_ratio), ("recent_ratio", recent_ratio)):
            if not 0 <= ratio <= 1:
                raise ValueError(f"{name}={ratio!r} must be in [0, 1]")
        return cls(int(context_len * heavy_ratio), max(1, int(context_len * recent_ratio)), unit)

    def max_kept_tokens(self, block_size):
        if self.unit == "block":  # whole blocks: the recent ones may start up to block_size - 1 tokens early
            return self.heavy // block_size * block_size + self.recent + block_size - 1
        return self.heavy + self.recent

    def max_held_blocks(self, block_size):
        recent_blocks = math.ceil(self.recent / block_size) + 1
        return recent_blocks + (self.heavy // block_size if self.unit == "block" else self.heavy)

    observe = staticmethod(accumulate_attention)

    def keep_mask(self, num_tokens, held, scores, block_size):
        if scores is None:
            scores = torch.zeros(held.shape)
        scores = scores.float().cpu()
        if self.unit == "token":
            keep = held >= num_tokens - self.recent
            candidates = (~keep).nonzero().flatten()  # older held tokens
            # stable sort on -score: equal scores keep the earlier token
            order = torch.sort(-scores[candidates], stable=True).indices[: self.heavy]
            keep[candidates[order]] = True
            return keep
        blocks = held // block_size  # (H,) logical block of each
        first_recent_block = max(num_tokens - self.recent, 0) // block_size
        keep = blocks >= first_recent_block
        old_blocks, inverse = blocks[~keep].unique(return_inverse=True)
        block_scores = torch.zeros(old_blocks.shape).index_add_(0, inverse, scores[~keep])
        order = torch.sort(-block_scores, stable=True).indices[: self.heavy // block_size]
        return keep | torch.isin(blocks, old_blocks[order])


def make_policy(
    name: str,
    window: int | None = None,
    num_sinks: int = 4,
    heavy: int | None = None,
    recent: int | None = None,
    unit: str = "token",
) -> EvictionPolicy:
    """The policy for an engine's `--kv-policy` value and its budgets (window: window/sinks; heavy and
    recent: h2o)."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV eviction policy {name!r}; choose one of {list(POLICIES)}")
    if name == "none":
        return NoEviction()
    if name in ("window", "sinks"):
        if window is None:
            raise ValueError(f"KV policy {name!r} needs window=<tokens>")
        return WindowPolicy(window) if name == "window" else SinksPolicy(window, num_sinks)
    if heavy is None or recent is None:
        raise ValueError(
            f"KV policy 'h2o' needs heavy=<tokens> and recent=<tokens>; got heavy={heavy!r}, "
            f"recent={recent!r}"
        )
    return H2OPolicy(heavy, recent, unit)


def parse_policy_spec(text: str) -> tuple[str, dict[str, int | str]]:
    """A command line's policy -> (name, make_policy keywords): 'none', 'window:4096', 'sinks:4096' (4 sinks),
    'sinks:window=4096,num_sinks=8', 'h2o:512' (heavy = recent = 512), 'h2o:heavy=256,recent=768,unit=block'."""
    name, _, rest = text.strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown KV eviction policy {name!r} in {text!r}; choose one of {list(POLICIES)}")
    if not rest:
        return name, {}
    if "=" not in rest:
        try:
            budget = int(rest)
        except ValueError:
            raise ValueError(
                f"policy {text!r}: {rest!r} is not a token budget (give e.g. {name}:4096)"
            ) from None
        return name, ({"heavy": budget, "recent": budget} if name == "h2o" else {"window": budget})
    args: dict[str, int | str] = {}
    for item in rest.split(","):
        key, _, value = item.partition("=")
        if key not in ("window", "num_sinks", "heavy", "recent", "unit") or not value:
            raise ValueError(
                f"policy {text!r}: bad budget {item!r}; use window=, num_sinks=, heavy=, recent=, unit="
            )
        if key == "unit":
            args[key] = value
            continue
        try:
            args[key] = int(value)
        except ValueError:
            raise ValueError(f"policy {text!r}: {key}={value!r} is not an integer number of tokens") from None
    return name, args
