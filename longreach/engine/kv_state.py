"""The engine's KV storage choices and the per-request KV state they need beyond the block table.

`kv_storage` turns a CacheConfig into the cache's quantizer and eviction policy, refusing combinations the
cache cannot honour. `KVStates` holds int4's window slot and quantized count, an eviction policy's kept
positions and H2O scores per request: created on a request's first step, released whenever its blocks are
freed (finish, abort, preemption: a preempted request is recomputed from scratch, so its state starts over).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longreach.config import CacheConfig, ModelConfig
from longreach.kvcache.policies import EvictionPolicy, NoEviction, make_policy
from longreach.kvcache.quant import KVQuantizer, make_kv_quantizer

INT4_BLOCK_SIZE = 32     # int4 KV's key groups of 32 tokens must not straddle blocks


def kv_storage(cc: CacheConfig, cfg: ModelConfig, model_dtype: torch.dtype
                ) -> tuple[KVQuantizer, EvictionPolicy | None]:
    """The cache's quantizer and eviction policy (None for 'none'), checked against each other and the model."""
    quantizer = make_kv_quantizer(cc.kv_cache_dtype, model_dtype)
    if quantizer.needs_window and cc.block_size % quantizer.group_size:
        raise ValueError(f"kv_cache_dtype 'int4' needs block_size to be a multiple of {quantizer.group_size} "
                         f"(its key groups must not straddle blocks), got block_size={cc.block_size}; "
                         f"use block_size={INT4_BLOCK_SIZE} (the default with int4)")
    try:
        policy = make_policy(cc.kv_policy, **cc.kv_policy_args)
    except TypeError:
        raise ValueError(f"kv_policy_args {sorted(cc.kv_policy_args)} are not budgets of kv_policy "
                         f"{cc.kv_policy!r}; window/sinks take window (and num_sinks), h2o takes heavy and recent "
                         "(and unit)") from None
    if isinstance(policy, NoEviction):
        return quantizer, None
    if quantizer.needs_window:
        raise ValueError(f"kv_policy {cc.kv_policy!r} cannot evict from an int4 KV cache (its per-request window "
                         "and token groups assume every token stays); use kv_cache_dtype int8 or bf16")
    if cc.kv_policy != "window" and any(cfg.window_size(i)[0] >= 0 for i in range(cfg.num_hidden_layers)):
        raise ValueError(f"kv_policy {cc.kv_policy!r} keeps non-contiguous positions, which a model with "
                         "sliding-window layers cannot mask; use kv_policy 'window'")
    return quantizer, policy


@dataclass
class SeqKVState:
    window_slot: int | None = None
    num_quantized: int = 0                 # int4: tokens [0, num_quantized) are quantized in the blocks
    held: torch.Tensor | None = None       # (H,) int64 positions still cached, ascending; None: none evicted yet
    scores: torch.Tensor | None = None     # (H,) fp32 H2O accumulated attention of the held positions


class KVStates:
    """request id -> SeqKVState, and the pool of int4 window slots (one per running request)."""

    def __init__(self, num_window_slots: int = 0):
        self.states: dict[str, SeqKVState] = {}
        self.free_window_slots = list(range(num_window_slots - 1, -1, -1))

    def get(self, request_id: str) -> SeqKVState:
        state = self.states.get(request_id)
        if state is None:
            state = self.states[request_id] = SeqKVState()
        return state

    def window_slot(self, request_id: str) -> int:
        state = self.get(request_id)
        if state.window_slot is None:
            if not self.free_window_slots:
                raise RuntimeError("no free int4 window slot: more running requests than max_num_seqs")
            state.window_slot = self.free_window_slots.pop()
        return state.window_slot

    @property
    def num_window_slots_used(self) -> int:
        return sum(s.window_slot is not None for s in self.states.values())

    def release(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None and state.window_slot is not None:
            self.free_window_slots.append(state.window_slot)
