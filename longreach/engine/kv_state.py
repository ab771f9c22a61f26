"""The per-request KV state some layouts need beyond the block table (engine/layouts.py).

`KVStates` holds int4's window slot and quantized count, an eviction policy's kept positions and H2O scores
per request: created on a request's first step, released whenever its blocks are freed (finish, abort,
preemption: a preempted request is recomputed from scratch, so its state starts over).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SeqKVState:
    window_slot: int | None = None
    num_quantized: int = 0  # int4: tokens [0, num_quantized) are quantized in the blocks
    held: torch.Tensor | None = None  # (H,) int64 positions still cached, ascending; None: none evicted yet
    scores: torch.Tensor | None = None  # (H,) fp32 H2O accumulated attention of the held positions


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
