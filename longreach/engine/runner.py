"""Turns a scheduled step into one flat forward pass (vLLM's GPU model runner, nano-vllm's ModelRunner).

All scheduled requests go through the model together as one `(T,)` token batch: single-token sequences
(decodes) first, then prefills starting at position 0, then continued prefill chunks (see PagedBatch). The runner computes each new token's position and
cache slot from the request's block table, the per-sequence key lengths, and the rows whose logits are
needed (the last token of every sequence that catches up to its full length this step).

With int4 KV or an eviction policy (`gathers`), fresh prefills come first (int4 only; under a policy every
sequence gathers), then the sequences whose keys are gathered per sequence (`kvcache.paged_gather`): int4
reads [0, length) through its window slot; a policy reads the positions it kept plus the step's new ones.
After the scheduler has advanced the requests, `after_step` commits int4's quantized counts and applies the
policy: whole blocks left without a kept token go back to the pool.
"""
from __future__ import annotations

import torch

from longreach.attention import AttentionMetadata
from longreach.engine.kv_state import KVStates
from longreach.engine.scheduler import ScheduledBatch
from longreach.engine.sequence import RequestStatus, Sequence
from longreach.kvcache.block_pool import KVCacheManager
from longreach.kvcache.paged_cache import PagedBatch, PagedKVCache
from longreach.kvcache.paged_gather import GatheredRun, SeqWrite
from longreach.kvcache.policies import EvictionPolicy, H2OPolicy, NoEviction, WindowPolicy, accumulate_attention
from longreach.model.llama import LlamaForCausalLM


def _slots(block_ids: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [start, end) of a request whose block table is `block_ids` (int64)."""
    pos = torch.arange(start, end)
    return block_ids[pos // block_size] * block_size + pos % block_size


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, kv_manager: KVCacheManager,
                 policy: EvictionPolicy | None = None, kv_states: KVStates | None = None):
        self.model = model
        self.cache = cache
        self.kv = kv_manager
        self.block_size = kv_manager.block_size
        self.device = next(model.parameters()).device
        self.policy = None if policy is None or isinstance(policy, NoEviction) else policy
        self.is_int4 = cache.quantizer.needs_window
        self.is_rope_length_dependent = model.config.rope.is_length_dependent
        self.kv_states = kv_states or KVStates()
        self._step: list[tuple[Sequence, int, SeqWrite | None, int | None]] = []
        self._gathered: GatheredRun | None = None

    @property
    def gathers(self) -> bool:
        return self.policy is not None or self.is_int4

    def prepare(self, batch: ScheduledBatch) -> tuple[list[Sequence], dict]:
        """Flat inputs of one step: the sequences that sample (in logits row order) and the model's kwargs."""
        if self.gathers:
            return self._prepare_gathered(batch)
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
        last_rows, sampling = _sampling_rows(seqs, counts)
        meta = AttentionMetadata.from_seqlens([1] * num_decodes + fresh_lens + cont_lens_q,
                                              [p + 1 for p in positions] + fresh_lens + cont_lens_k, device=dev)
        kwargs = dict(input_ids=input_ids_t, positions=positions_t, meta=meta, kv_cache=self.cache.bind(paged),
                      logits_indices=torch.tensor(last_rows, dtype=torch.long, device=dev),
                      rope_seq_len=self._rope_lengths(seqs, counts))
        return sampling, kwargs

    def _prepare_gathered(self, batch: ScheduledBatch) -> tuple[list[Sequence], dict]:
        """`prepare` for int4 KV or an eviction policy: [fresh prefills (int4 only)] + [gathered sequences]."""
        bs, dev, states = self.block_size, self.device, self.kv_states
        own_keys = [self.policy is None and s.num_computed_tokens == 0 for s in batch.seqs]
        order = sorted(range(len(batch.seqs)), key=lambda i: not own_keys[i])
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        num_fresh = sum(own_keys)
        is_h2o = isinstance(self.policy, H2OPolicy)
        ids_t, pos_t, slot_t, writes, step = [], [], [], [], []
        fresh_lens, lens_q, lens_k, kv_slots, reads, q_positions, k_positions = [], [], [], [], [], [], []
        row = 0
        for i, (s, n) in enumerate(zip(seqs, counts)):
            start, end = s.num_computed_tokens, s.num_computed_tokens + n
            table = torch.tensor(self.kv.block_ids(s.request_id), dtype=torch.long)
            new_pos = torch.arange(start, end)
            ids_t.append(torch.tensor(s.token_ids[start:end], dtype=torch.long))
            pos_t.append(new_pos)
            slot_t.append(_slots(table, start, end, bs))
            write = None
            if self.is_int4:
                state = states.get(s.request_id)
                write = SeqWrite(row, row + n, start, table.to(dev), state.num_quantized,
                                 states.window_slot(s.request_id))
                writes.append(write)
            row += n
            step.append((s, n, write, len(lens_q) if is_h2o and i >= num_fresh else None))
            if i < num_fresh:
                fresh_lens.append(n)
                continue
            if self.policy is not None:
                held = states.get(s.request_id).held
                key_pos = torch.cat([torch.arange(start) if held is None else held, new_pos])
                kv_slots.append(table[key_pos // bs] * bs + key_pos % bs)
            else:
                key_pos = None
                reads.append((len(writes) - 1, end))
            lens_q.append(n)
            lens_k.append(end if key_pos is None else key_pos.numel())
            if is_h2o:
                q_positions.append(new_pos)
                k_positions.append(key_pos)
        gathered = None
        if lens_q:
            gathered = GatheredRun(
                AttentionMetadata.from_seqlens(lens_q, lens_k, device=dev),
                kv_slots=torch.cat(kv_slots).to(dev) if kv_slots else None, reads=tuple(reads) if reads else None,
                query_positions=tuple(q_positions) if is_h2o else None,
                key_positions=tuple(k_positions) if is_h2o else None, mass=[None] * len(lens_q) if is_h2o else None)
        paged = PagedBatch(
            slot_mapping=torch.cat(slot_t).to(dev), num_decodes=0, decode_block_table=None, decode_seqlens=None,
            num_fresh_tokens=sum(fresh_lens),
            fresh_meta=AttentionMetadata.from_seqlens(fresh_lens, device=dev) if fresh_lens else None,
            continued_meta=None, continued_kv_slots=None, gathered=gathered,
            seq_writes=tuple(writes) if self.is_int4 else None,
            window_left=self.policy.window if isinstance(self.policy, WindowPolicy) else None)
        self._step, self._gathered = step, gathered
        last_rows, sampling = _sampling_rows(seqs, counts)
        meta = AttentionMetadata.from_seqlens(counts, [s.num_computed_tokens + n for s, n in zip(seqs, counts)],
                                              device=dev)
        kwargs = dict(input_ids=torch.cat(ids_t).to(dev), positions=torch.cat(pos_t).to(dev), meta=meta,
                      kv_cache=self.cache.bind(paged),
                      logits_indices=torch.tensor(last_rows, dtype=torch.long, device=dev),
                      rope_seq_len=self._rope_lengths(seqs, counts))
        return sampling, kwargs

    def _rope_lengths(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor | None:
        """(T,) per-token RoPE table lengths, each its own request's (fixed at admission), for length-dependent
        rope types; None otherwise. Never the batch's longest position: that would make a request's rotation
        depend on its neighbours and its chunking."""
        if not self.is_rope_length_dependent:
            return None
        lengths = torch.tensor([s.rope_seq_len for s in seqs], dtype=torch.long)
        return torch.repeat_interleave(lengths, torch.tensor(counts)).to(self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. Returns the sequences that sample (in row order) and their logits (n, V)."""
        self._step, self._gathered = [], None
        sampling, kwargs = self.prepare(batch)
        logits = self.model(**kwargs)
        for seq in batch.seqs:               # the step's peak: its new tokens are stored, nothing evicted yet
            num_blocks = self.kv.num_held_blocks(seq.request_id)
            num_bytes = num_blocks * self.cache.block_bytes + self.is_int4 * self.cache.window_slot_bytes
            seq.metrics.max_kv_blocks = max(seq.metrics.max_kv_blocks, num_blocks)
            seq.metrics.max_kv_bytes = max(seq.metrics.max_kv_bytes, num_bytes)
        return sampling, logits

    def after_step(self) -> None:
        """After the scheduler advanced the step's requests: commit int4's quantized counts and evict
        (requests that finished or were preempted have released their state already)."""
        for seq, num_new, write, mass_index in self._step:
            if seq.status is not RequestStatus.RUNNING:
                continue
            state = self.kv_states.get(seq.request_id)
            if write is not None:
                state.num_quantized = write.new_num_quantized
            if self.policy is None:
                continue
            end = seq.num_computed_tokens
            start = end - num_new
            held = torch.cat([torch.arange(start) if state.held is None else state.held, torch.arange(start, end)])
            scores = None
            if mass_index is not None:
                scores = accumulate_attention(state.scores, self._gathered.mass[mass_index].cpu())
            plan = self.policy.plan(end, self.block_size, held=held, scores=scores)
            if plan.free_blocks:
                self.kv.evict_blocks(seq.request_id, plan.free_blocks)
            state.held = plan.keep
            state.scores = None if scores is None else scores[plan.keep_index]
        self._step, self._gathered = [], None


def _sampling_rows(seqs: list[Sequence], counts: list[int]) -> tuple[list[int], list[Sequence]]:
    """Rows to sample: the last token of each sequence that catches up to its length this step."""
    last_rows, sampling, row = [], [], 0
    for seq, n in zip(seqs, counts):
        row += n
        if seq.num_computed_tokens + n == seq.num_tokens:
            last_rows.append(row - 1)
            sampling.append(seq)
    return last_rows, sampling
