"""The engine side of the batch-invariant mode (`longreach.batch_invariant`): its KV layout and its switch.

`BatchInvariantLayout` addresses the paged cache like `PagedLayout` (same blocks, same slots, same writes),
but every sequence of a step, decode or prefill chunk, attends through one function,
`attention.batch_invariant.fixed_split_attention`, over its keys read back from the pages: a token's
attention is reduced in an order fixed by its position alone. Token-local storage only (bf16/fp16/fp32,
int8); int4's window and eviction policies keep keys elsewhere and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longreach.attention import AttentionMetadata
from longreach.attention.batch_invariant import SeqQueries, TilePlan, fixed_split_attention
from longreach.batch_invariant import BatchInvariantLinear, apply_batch_invariant, resolve_batch_invariant
from longreach.engine.layouts import KVLayout, StepInputs
from longreach.engine.scheduler import ScheduledBatch
from longreach.kvcache.planner import KVPlan


@dataclass(frozen=True)
class BatchInvariantBatch:
    """Cache addressing of one step: where its tokens are written, and the query tiles of its sequences."""

    slot_mapping: torch.Tensor  # (T,) int64
    plan: TilePlan

    def write(self, cache, store: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        cache.write_slots(store, k, v, self.slot_mapping)

    def attend(self, cache, store, q, k, v, window_size: tuple[int, int]) -> torch.Tensor:
        """q (T, Hq, D) of the step, its K/V already written -> (T, Hq, D): the Triton kernel for plain
        pages on CUDA, the PyTorch version otherwise (same policy; their bits may differ from each other)."""
        kernel = _triton_kernel() if q.is_cuda and cache.is_plain else None
        if kernel is not None:
            return kernel(q, store["k"], store["v"], self.plan, window_size)
        return fixed_split_attention(
            q, lambda slots: cache.read_slots(store, slots, torch.float32), self.plan, window_size
        )


_TRITON: list = []


def _triton_kernel():
    """`fixed_split_attention_triton`, or None when Triton does not import."""
    if not _TRITON:
        try:
            from longreach.attention.triton_batch_invariant import (  # lazy: optional heavy dependency (triton)
                fixed_split_attention_triton,
            )
        except ImportError:
            fixed_split_attention_triton = None
        _TRITON.append(fixed_split_attention_triton)
    return _TRITON[0]


class BatchInvariantLayout(KVLayout):
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs, dev = self.block_size, self.device
        seqs, counts = list(batch.seqs), list(batch.num_new_tokens)
        ids, positions, slots, queries, row = [], [], [], [], 0
        for seq, n in zip(seqs, counts):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = torch.tensor(self.kv.block_ids(seq.request_id), dtype=torch.long)
            pos = torch.arange(end)
            key_slots = table[pos // bs] * bs + pos % bs  # (end,) positions [0, end)
            ids.append(torch.tensor(seq.token_ids[start:end], dtype=torch.long))
            positions.append(pos[start:])
            slots.append(key_slots[start:])
            queries.append(SeqQueries(row, start, end, key_slots))
            row += n
        cache_batch = BatchInvariantBatch(torch.cat(slots).to(dev), TilePlan.build(queries, row, dev))
        meta = AttentionMetadata.from_seqlens(counts, [q.end for q in queries], device=dev)
        return self._inputs(seqs, counts, cache_batch, meta, ids, positions)


def is_batch_invariant(model: nn.Module) -> bool:
    return any(isinstance(m, BatchInvariantLinear) for m in model.modules())


def configure_batch_invariant(
    model: nn.Module, flag: bool | None, plan: KVPlan, tensor_parallel: bool
) -> bool:
    """Put the model in the mode asked for and return whether it is on. flag True/False: on/off; None:
    LONGREACH_BATCH_INVARIANT, or on if the model was already switched on (an engine rebuilt over it)."""
    enabled = resolve_batch_invariant(flag) or (flag is None and is_batch_invariant(model))
    if not enabled:
        for module in model.modules():
            if type(module) is BatchInvariantLinear:
                module.__class__ = nn.Linear
        return False
    if tensor_parallel:
        raise ValueError(
            "batch_invariant needs tensor_parallel_size=1: a sharded row-parallel linear sums its "
            "shards in an all-reduce whose order is the communication library's"
        )
    if plan.policy is not None or plan.quantizer.needs_window:
        raise ValueError(
            "batch_invariant needs token-local KV storage (kv_cache_dtype auto/bf16/fp16/fp32/int8, "
            "kv_policy none); int4 KV and eviction policies keep keys outside the pages it reads"
        )
    apply_batch_invariant(model)
    return True
