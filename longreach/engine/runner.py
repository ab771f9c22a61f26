"""Turns a scheduled step into one flat forward pass (vLLM's GPU model runner, nano-vllm's ModelRunner).

All scheduled requests go through the model together as one `(T,)` token batch: single-token sequences
(decodes) first, then prefills starting at position 0, then continued prefill chunks (see PagedBatch). The runner computes each new token's position and
cache slot from the request's block table, the per-sequence key lengths, and the rows whose logits are
needed (the last token of every sequence that catches up to its full length this step).
"""
from __future__ import annotations

import torch

from longreach.attention import AttentionMetadata
from longreach.engine.scheduler import ScheduledBatch
from longreach.engine.sequence import Sequence
from longreach.kvcache.block_pool import KVCacheManager
from longreach.kvcache.paged_cache import PagedBatch, PagedKVCache
from longreach.model.llama import LlamaForCausalLM


def _slots(block_ids: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [start, end) of a request whose block table is `block_ids` (int64)."""
    pos = torch.arange(start, end)
    return block_ids[pos // block_size] * block_size + pos % block_size


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, kv_manager: KVCacheManager):
        self.model = model
        self.cache = cache
        self.kv = kv_manager
        self.block_size = kv_manager.block_size
        self.device = next(model.parameters()).device

    def prepare(self, batch: ScheduledBatch) -> tuple[list[Sequence], dict]:
        """Flat inputs of one step: the sequences that sample (in logits row order) and the model's kwargs."""
        bs = self.block_size
        # decodes first, then prefills starting at position 0, then continued prefill chunks
        kind = [0 if n == 1 else 1 if s.num_computed_tokens == 0 else 2
                for s, n in zip(batch.seqs, batch.num_new_tokens)]
        order = sorted(range(len(batch.seqs)), key=lambda i: kind[i])
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        num_decodes = kind.count(0)
        num_fresh = kind.count(1)
        tables = [self.kv.block_ids(s.request_id) for s in seqs]

        # decodes: one token each, built from Python scalars
        dec = seqs[:num_decodes]
        input_ids = [s.token_ids[s.num_computed_tokens] for s in dec]
        positions = [s.num_computed_tokens for s in dec]
        slots = [tables[b][p // bs] * bs + p % bs for b, p in enumerate(positions)]
        ids_t = [torch.tensor(input_ids, dtype=torch.long)]
        pos_t = [torch.tensor(positions, dtype=torch.long)]
        slot_t = [torch.tensor(slots, dtype=torch.long)]
        # prefills (fresh and continued): ranges
        fresh_lens, cont_lens_q, cont_lens_k, kv_slots = [], [], [], []
        for i, (s, n, table) in enumerate(zip(seqs, counts, tables)):
            if i < num_decodes:
                continue
            start, end = s.num_computed_tokens, s.num_computed_tokens + n
            block_ids = torch.tensor(table, dtype=torch.long)
            ids_t.append(torch.tensor(s.token_ids[start:end], dtype=torch.long))
            pos_t.append(torch.arange(start, end))
            slot_t.append(_slots(block_ids, start, end, bs))
            if i < num_decodes + num_fresh:
                fresh_lens.append(n)
            else:
                cont_lens_q.append(n)
                cont_lens_k.append(end)
                kv_slots.append(_slots(block_ids, 0, end, bs))

        dev = self.device
        input_ids_t = torch.cat(ids_t).to(dev)
        positions_t = torch.cat(pos_t).to(dev)
        dec_table = dec_lens = None
        if num_decodes:
            width = max(len(t) for t in tables[:num_decodes])
            dec_table = torch.tensor([t + [0] * (width - len(t)) for t in tables[:num_decodes]],
                                     dtype=torch.int32, device=dev)
            dec_lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev)
        paged = PagedBatch(
            slot_mapping=torch.cat(slot_t).to(dev), num_decodes=num_decodes,
            decode_block_table=dec_table, decode_seqlens=dec_lens, num_fresh_tokens=sum(fresh_lens),
            fresh_meta=AttentionMetadata.from_seqlens(fresh_lens, device=dev) if fresh_lens else None,
            continued_meta=AttentionMetadata.from_seqlens(cont_lens_q, cont_lens_k, device=dev) if cont_lens_q else None,
            continued_kv_slots=torch.cat(kv_slots).to(dev) if kv_slots else None)
        # rows to sample: the last token of each sequence that catches up this step
        last_rows, sampling, row = [], [], 0
        for s, n in zip(seqs, counts):
            row += n
            if s.num_computed_tokens + n == s.num_tokens:
                last_rows.append(row - 1)
                sampling.append(s)
        meta = AttentionMetadata.from_seqlens([1] * num_decodes + fresh_lens + cont_lens_q,
                                              [p + 1 for p in positions] + fresh_lens + cont_lens_k, device=dev)
        kwargs = dict(input_ids=input_ids_t, positions=positions_t, meta=meta, kv_cache=self.cache.bind(paged),
                      logits_indices=torch.tensor(last_rows, dtype=torch.long, device=dev))
        return sampling, kwargs

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. Returns the sequences that sample (in row order) and their logits (n, V)."""
        sampling, kwargs = self.prepare(batch)
        return sampling, self.model(**kwargs)
