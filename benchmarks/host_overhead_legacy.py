"""The paged layout's step-input construction as it was before persistent buffers (git 5522bf4), kept so
`host_overhead.py --legacy` can measure the old and new paths on the same tree, in the same run: every step
builds its tensors from Python lists, and the decode block table from every request's whole table."""

from __future__ import annotations

import types

import torch

from longreach.attention import AttentionMetadata
from longreach.engine.layouts import StepInputs, _ordered, _slots
from longreach.kvcache.paged_cache import PagedBatch


def legacy_prepare(self, batch) -> StepInputs:
    bs, dev = self.block_size, self.device
    # decodes first, then prefills starting at position 0, then continued prefill chunks
    seqs, counts = _ordered(batch, lambda s, n: 0 if n == 1 else 1 if s.num_computed_tokens == 0 else 2)
    num_decodes = sum(1 for n, s in zip(counts, seqs) if n == 1)
    tables = [self.kv.block_ids(s.request_id) for s in seqs]
    positions = [s.num_computed_tokens for s in seqs[:num_decodes]]  # decodes: Python scalars
    ids_t = [torch.tensor([s.token_ids[p] for s, p in zip(seqs, positions)], dtype=torch.long)]
    pos_t = [torch.tensor(positions, dtype=torch.long)]
    slot_t = [
        torch.tensor([tables[b][p // bs] * bs + p % bs for b, p in enumerate(positions)], dtype=torch.long)
    ]
    fresh_lens, cont_lens_q, cont_lens_k, kv_slots = [], [], [], []
    for s, n, table in zip(seqs[num_decodes:], counts[num_decodes:], tables[num_decodes:]):
        start, end = s.num_computed_tokens, s.num_computed_tokens + n
        block_ids = torch.tensor(table, dtype=torch.long)
        ids_t.append(torch.tensor(s.token_ids[start:end], dtype=torch.long))
        pos_t.append(torch.arange(start, end))
        slot_t.append(_slots(block_ids, start, end, bs))
        if start == 0:
            fresh_lens.append(n)
        else:
            cont_lens_q.append(n)
            cont_lens_k.append(end)
            kv_slots.append(_slots(block_ids, 0, end, bs))
    dec_table = dec_lens = None
    if num_decodes:
        width = max(len(t) for t in tables[:num_decodes])
        dec_table = torch.tensor(
            [t + [0] * (width - len(t)) for t in tables[:num_decodes]], dtype=torch.int32, device=dev
        )
        dec_lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev)
    paged = PagedBatch(
        slot_mapping=torch.cat(slot_t).to(dev),
        num_decodes=num_decodes,
        decode_block_table=dec_table,
        decode_seqlens=dec_lens,
        num_fresh_tokens=sum(fresh_lens),
        fresh_meta=AttentionMetadata.from_seqlens(fresh_lens, device=dev) if fresh_lens else None,
        continued_meta=AttentionMetadata.from_seqlens(cont_lens_q, cont_lens_k, device=dev)
        if cont_lens_q
        else None,
        continued_kv_slots=torch.cat(kv_slots).to(dev) if kv_slots else None,
    )
    meta = AttentionMetadata.from_seqlens(
        [1] * num_decodes + fresh_lens + cont_lens_q,
        [p + 1 for p in positions] + fresh_lens + cont_lens_k,
        device=dev,
    )
    return self._inputs(seqs, counts, paged, meta, ids_t, pos_t)


def use_legacy_path(engine) -> None:
    """Switch an engine's runner to the old step inputs and its old O(blocks) count of held blocks per step."""
    layout = engine.runner.layout
    layout.prepare = types.MethodType(legacy_prepare, layout)
    layout.evicts = True  # the runner then counts held blocks over each whole table, as it did
