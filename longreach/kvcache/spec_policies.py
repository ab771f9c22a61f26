"""The KV bytes of one request under an eviction policy: the calculator (`spec`) for a bounded cache.

A policy (`kvcache.policies`) bounds the tokens a request keeps, so its cache stops growing with the
context: between steps it holds at most `max_held_blocks(block_size)` blocks, whatever the context length.
The bound is counted in whole blocks (a partly evicted block is still held), which is what the engine's pool
pays; one decode step adds at most one block. Bytes per token come from `spec.kv_bytes_per_token`.
"""

from __future__ import annotations

from typing import NamedTuple

from longreach.config import ModelConfig
from longreach.kvcache.policies import EvictionPolicy
from longreach.kvcache.spec import KVBytes, kv_bytes_per_request

DEFAULT_BLOCK_SIZE = 16


class PolicyBound(NamedTuple):
    """Tokens a request keeps under a policy, and the tokens its whole blocks hold (what memory pays for)."""

    tokens_kept: int
    tokens_held: int


def tokens_under_policy(
    policy: EvictionPolicy, context_len: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> PolicyBound:
    """The most tokens one request of `context_len` tokens keeps, and holds in whole blocks, between steps."""
    max_kept, max_blocks = policy.max_kept_tokens(block_size), policy.max_held_blocks(block_size)
    held = context_len if max_blocks is None else min(context_len, max_blocks * block_size)
    kept = context_len if max_kept is None else min(context_len, max_kept)
    return PolicyBound(kept, held)


def kv_bytes_per_request_under_policy(
    model: ModelConfig,
    context_len: int,
    dtype: str,
    policy: EvictionPolicy,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> KVBytes:
    """K and V of one request of `context_len` tokens whose cache `policy` bounds (in whole blocks)."""
    held = tokens_under_policy(policy, context_len, block_size).tokens_held
    return kv_bytes_per_request(model, held, dtype)
