"""Model config + cache config + device -> a KV plan (nano-vllm's `allocate_kv_cache`, in one function).

The plan fixes, once, everything the engine's KV cache depends on: the storage scheme (a `KVQuantizer`:
bf16/fp16/fp32, int8, fp8, int4) and the eviction policy, checked against each other and the model; the bytes of
one block and of int4's per-request window slot; how many blocks fit (a count, bytes, or a fraction of the
free memory, agreed by every tensor-parallel rank); and whether prefix caching can be honoured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from longreach.config import CacheConfig, ModelConfig, SchedulerConfig
from longreach.kvcache.paged_cache import num_blocks_for
from longreach.kvcache.policies import EvictionPolicy, NoEviction, make_policy
from longreach.kvcache.quant import KVQuantizer, make_kv_quantizer

INT4_BLOCK_SIZE = 32  # int4 KV's key groups of 32 tokens must not straddle blocks
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVPlan:
    """What the engine's KV cache is: storage, policy, sizes (per rank under tensor parallelism)."""

    quantizer: KVQuantizer
    policy: EvictionPolicy | None  # None: every token stays
    block_size: int
    num_blocks: int
    num_kv_heads: int  # this rank's KV heads
    head_dim: int
    num_window_slots: int  # int4: one full-precision recent-token slot per running request
    block_bytes: int  # one block across every layer, scales included
    window_slot_bytes: int  # one int4 window slot across every layer (0 otherwise)
    enable_prefix_caching: bool

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.num_window_slots * self.window_slot_bytes

    def max_held_tokens(self, longest: int, step_tokens: int) -> int:
        """The most KV tokens a request of up to `longest` tokens holds at once; under an eviction policy its
        kept blocks plus one step's new tokens (a prefill chunk of `step_tokens`) and a partial block."""
        if self.policy is None:
            return longest
        bs = self.block_size
        step = min(step_tokens, longest)
        return min(longest, (self.policy.max_held_blocks(bs) + -(-step // bs) + 1) * bs)


def kv_storage(
    cc: CacheConfig, cfg: ModelConfig, model_dtype: torch.dtype
) -> tuple[KVQuantizer, EvictionPolicy | None]:
    """The cache's quantizer and eviction policy (None for 'none'), checked against each other and the model."""
    quantizer = make_kv_quantizer(cc.kv_cache_dtype, model_dtype)
    if quantizer.needs_window and cc.block_size % quantizer.group_size:
        raise ValueError(
            f"kv_cache_dtype 'int4' needs block_size to be a multiple of {quantizer.group_size} "
            f"(its key groups must not straddle blocks), got block_size={cc.block_size}; "
            f"use block_size={INT4_BLOCK_SIZE} (the default with int4)"
        )
    try:
        policy = make_policy(cc.kv_policy, **cc.kv_policy_args)
    except TypeError:
        raise ValueError(
            f"kv_policy_args {sorted(cc.kv_policy_args)} are not budgets of kv_policy "
            f"{cc.kv_policy!r}; window/sinks take window (and num_sinks), h2o takes heavy and recent "
            "(and unit)"
        ) from None
    if isinstance(policy, NoEviction):
        return quantizer, None
    if quantizer.needs_window:
        raise ValueError(
            f"kv_policy {cc.kv_policy!r} cannot evict from an int4 KV cache (its per-request window "
            "and token groups assume every token stays); use kv_cache_dtype int8 or bf16"
        )
    if cc.kv_policy != "window" and any(cfg.window_size(i)[0] >= 0 for i in range(cfg.num_hidden_layers)):
        raise ValueError(
            f"kv_policy {cc.kv_policy!r} keeps non-contiguous positions, which a model with "
            "sliding-window layers cannot mask; use kv_policy 'window'"
        )
    return quantizer, policy


def _can_cache_prefixes(cc: CacheConfig, quantizer: KVQuantizer, policy: EvictionPolicy | None) -> bool:
    if not cc.enable_prefix_caching:
        return False
    if quantizer.needs_window:
        why = "int4 KV keeps recent tokens in a per-request window, so a full block may not be quantized yet"
    elif policy is not None:
        why = f"kv_policy {cc.kv_policy!r} makes a block's K/V depend on what was evicted before it"
    else:
        return True
    logger.info("prefix caching is off: %s", why)
    return False


def plan_kv_cache(
    cfg: ModelConfig,
    cc: CacheConfig,
    sc: SchedulerConfig,
    dtype: torch.dtype,
    device: torch.device,
    tp_size: int = 1,
    agree_min: Callable[[int], int] | None = None,
) -> KVPlan:
    """The KV plan for a model (its dtype and device) under a cache and scheduler config.

    tp_size: tensor-parallel ranks (each holds num_key_value_heads / tp_size heads); agree_min: reduces the
    block count to the smallest any rank can hold (every rank must schedule the same blocks)."""
    quantizer, policy = kv_storage(cc, cfg, dtype)
    num_kv_heads, head_dim, layers, bs = (
        cfg.num_key_value_heads // tp_size,
        cfg.head_dim,
        cfg.num_hidden_layers,
        cc.block_size,
    )
    num_window_slots = sc.max_num_seqs if quantizer.needs_window else 0
    block_bytes = layers * quantizer.block_bytes(bs, num_kv_heads, head_dim)
    window_slot_bytes = layers * quantizer.window_bytes(num_kv_heads, head_dim)
    window_bytes = num_window_slots * window_slot_bytes
    sizing = cc
    if cc.kv_cache_memory is not None and window_bytes:
        if cc.kv_cache_memory <= window_bytes + block_bytes:
            raise ValueError(
                f"kv_cache_memory={cc.kv_cache_memory} bytes does not hold int4's window slots "
                f"({window_bytes} bytes: max_num_seqs={num_window_slots} x the recent-token window) "
                "plus one block; raise it or lower max_num_seqs"
            )
        sizing = replace(cc, kv_cache_memory=cc.kv_cache_memory - window_bytes)
    max_useful_blocks = sc.max_num_seqs * -(-sc.max_model_len // bs)
    num_blocks = num_blocks_for(sizing, block_bytes, device, max_useful_blocks)
    if agree_min is not None:
        num_blocks = agree_min(num_blocks)
    return KVPlan(
        quantizer,
        policy,
        bs,
        num_blocks,
        num_kv_heads,
        head_dim,
        num_window_slots,
        block_bytes,
        window_slot_bytes if num_window_slots else 0,
        _can_cache_prefixes(cc, quantizer, policy),
    )
