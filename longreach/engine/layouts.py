"""How a step's requests address the KV cache: one strategy per storage layout, chosen once per engine.

- `PagedLayout` (every token stays, token-local storage: bf16/fp16/fp32, int8): decodes first (the paged
  decode kernel), then prefills starting at position 0 (their keys are their own tokens), then continued
  prefill chunks (keys gathered from their pages). vLLM's and nano-vllm's runner.
- `Int4Layout` (KIVI int4): a request's recent tokens live in its full-precision window slot and its blocks
  are quantized group-wise, so it is written and read as a whole; fresh prefills still attend their own K/V.
- `EvictionLayout` (window, sinks, H2O): a request holds only the positions its policy kept, so its keys are
  those positions' slots plus the step's new ones; after the step the policy frees whole blocks.

Each layout's `prepare` turns a scheduled batch into the model's inputs (`StepInputs`), and its `after_step`
receives those inputs back once the scheduler has advanced the requests.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longreach.attention import AttentionMetadata
from longreach.engine.kv_state import KVStates
from longreach.engine.scheduler import ScheduledBatch
from longreach.engine.sequence import RequestStatus, Sequence
from longreach.engine.step_buffers import BlockTableRows, Staging
from longreach.kvcache.block_pool import KVCacheManager
from longreach.kvcache.paged_cache import PagedBatch, PagedKVCache
from longreach.kvcache.paged_gather import GatheredBatch, GatheredRun, SeqWrite
from longreach.kvcache.planner import KVPlan
from longreach.kvcache.policies import WindowPolicy, accumulate_attention


@dataclass
class StepInputs:
    """One step's model inputs, the sequences that sample (in logits row order) and what `after_step` needs."""

    seqs: list[Sequence]  # in row order
    counts: list[int]  # new tokens per sequence
    sampling: list[Sequence]
    kwargs: dict[str, Any]
    writes: list[SeqWrite | None] = field(default_factory=list)  # int4: per sequence
    gathered: GatheredRun | None = None


def _slots(block_ids: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [start, end) of a request whose block table is `block_ids` (int64)."""
    pos = torch.arange(start, end)
    return block_ids[pos // block_size] * block_size + pos % block_size


def _sampling_rows(seqs: list[Sequence], counts: list[int]) -> tuple[list[int], list[Sequence]]:
    """Rows to sample: the last token of each sequence that catches up to its length this step."""
    last_rows, sampling, row = [], [], 0
    for seq, n in zip(seqs, counts):
        row += n
        if seq.num_computed_tokens + n == seq.num_tokens:
            last_rows.append(row - 1)
            sampling.append(seq)
    return last_rows, sampling


def _ordered(batch: ScheduledBatch, rank) -> tuple[list[Sequence], list[int]]:
    order = sorted(range(len(batch.seqs)), key=lambda i: rank(batch.seqs[i], batch.num_new_tokens[i]))
    return [batch.seqs[i] for i in order], [batch.num_new_tokens[i] for i in order]


class KVLayout(abc.ABC):
    """The strategy protocol (and shared plumbing)."""

    evicts = False  # whether block tables may hold evicted (None) entries

    def __init__(self, cache: PagedKVCache, kv_manager: KVCacheManager, device: torch.device):
        self.cache, self.kv, self.device = cache, kv_manager, device
        self.block_size = kv_manager.block_size

    @abc.abstractmethod
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's model inputs: ids, positions, attention metadata, the bound cache, rows to sample."""

    def after_step(self, step: StepInputs) -> None:
        """After the scheduler advanced the step's requests (finished / preempted ones already released)."""

    def _inputs(
        self, seqs, counts, cache_batch, meta: AttentionMetadata, ids, positions, staging=None
    ) -> StepInputs:
        """ids / positions: lists of per-sequence tensors, or already the (T,) tensors on the device;
        staging: a `Staging` to put the sampled rows in (else a new tensor)."""
        dev = self.device
        last_rows, sampling = _sampling_rows(seqs, counts)
        if staging is None:
            logits_indices = torch.tensor(last_rows, dtype=torch.long, device=dev)
        else:
            staging.array("logits_indices", len(last_rows), torch.long)[:] = last_rows
            logits_indices = staging.tensor("logits_indices", (len(last_rows),))
        kwargs = dict(
            input_ids=ids if isinstance(ids, torch.Tensor) else torch.cat(ids).to(dev),
            positions=positions if isinstance(positions, torch.Tensor) else torch.cat(positions).to(dev),
            meta=meta,
            kv_cache=self.cache.bind(cache_batch),
            logits_indices=logits_indices,
        )
        return StepInputs(seqs, counts, sampling, kwargs)


class PagedLayout(KVLayout):
    """Decodes first, then fresh prefills, then continued chunks. The step's tensors are written into
    persistent buffers (`step_buffers`): the decodes' ids, positions, slots and block-table rows in O(batch)
    host work, their block tables kept as persistent rows that grow one block at a time."""

    def __init__(self, cache: PagedKVCache, kv_manager: KVCacheManager, device: torch.device):
        super().__init__(cache, kv_manager, device)
        self.staging = Staging(device)
        self.rows = BlockTableRows(kv_manager)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        # decodes first, then prefills starting at position 0, then continued prefill chunks
        seqs, counts = _ordered(batch, lambda s, n: 0 if n == 1 else 1 if s.num_computed_tokens == 0 else 2)
        num_decodes = sum(1 for n in counts if n == 1)
        st = self.staging
        st.begin()
        total = sum(counts)
        host = {name: st.array(name, total, torch.long) for name in ("ids", "positions", "slots")}
        dec_table, dec_lens = self._fill_decodes(seqs[:num_decodes], host)
        prefill = self._fill_prefills(seqs[num_decodes:], counts[num_decodes:], num_decodes, host)
        fresh_lens, cont_lens_q, cont_lens_k, kv_slots = prefill
        dev = self.device
        paged = PagedBatch(
            slot_mapping=st.tensor("slots", (total,)),
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
        meta = self._meta(host["positions"][:num_decodes], fresh_lens + cont_lens_q, fresh_lens + cont_lens_k)
        ids, pos = st.tensor("ids", (total,)), st.tensor("positions", (total,))
        step = self._inputs(seqs, counts, paged, meta, ids, pos, staging=st)
        st.end()
        return step

    def _meta(self, decode_positions: np.ndarray, lens_q: list[int], lens_k: list[int]) -> AttentionMetadata:
        """The step's varlen metadata (decodes: one query, position + 1 keys; then the prefills' lengths),
        its cu_seqlens written into one staged (2, B + 1) int32 buffer."""
        num_decodes, num_seqs = len(decode_positions), len(decode_positions) + len(lens_q)
        cu = self.staging.array("cu_seqlens", 2 * (num_seqs + 1), torch.int32).reshape(2, num_seqs + 1)
        cu[:, 0] = 0
        cu[0, 1 : num_decodes + 1] = np.arange(1, num_decodes + 1)
        cu[0, num_decodes + 1 :] = num_decodes + np.cumsum(lens_q, dtype=np.int64)
        np.cumsum(decode_positions + 1, out=cu[1, 1 : num_decodes + 1], dtype=np.int32)
        done = int(cu[1, num_decodes])
        cu[1, num_decodes + 1 :] = done + np.cumsum(lens_k, dtype=np.int64)
        max_k = max(int(decode_positions.max()) + 1 if num_decodes else 0, max(lens_k, default=0))
        max_q = max(1 if num_decodes else 0, max(lens_q, default=0))
        both = self.staging.tensor("cu_seqlens", (2, num_seqs + 1))
        return AttentionMetadata(both[0], both[1], max_q, max_k)

    def _fill_decodes(self, seqs: list[Sequence], host: dict[str, np.ndarray]):
        """Write the decodes' rows [0, B) of ids, positions and slots; their (B, width) int32 block table and
        (B,) int32 key lengths on the device (None, None without decodes)."""
        if not seqs:
            return None, None
        num, bs, st = len(seqs), self.block_size, self.staging
        pos = host["positions"][:num]
        pos[:] = [s.num_computed_tokens for s in seqs]
        host["ids"][:num] = [s.token_ids[p] for s, p in zip(seqs, pos.tolist())]
        rows, width = self.rows.sync([s.request_id for s in seqs])
        table = st.array("table", num * width, torch.int32).reshape(num, width)
        np.take(self.rows.array[:, :width], rows, axis=0, out=table)
        np.add(pos, 1, out=st.array("lens", num, torch.int32), casting="unsafe")
        rows_of = np.arange(num)
        host["slots"][:num] = table[rows_of, pos // bs].astype(np.int64) * bs + pos % bs
        return st.tensor("table", (num, width)), st.tensor("lens", (num,))

    def _fill_prefills(self, seqs, counts, row: int, host: dict[str, np.ndarray]):
        """Write the prefills' rows (from `row` on); their lengths and the continued chunks' key slots."""
        bs = self.block_size
        fresh_lens, cont_lens_q, cont_lens_k, kv_slots = [], [], [], []
        for s, n in zip(seqs, counts):
            start, end = s.num_computed_tokens, s.num_computed_tokens + n
            block_ids = torch.tensor(self.kv.block_ids(s.request_id), dtype=torch.long)
            host["ids"][row : row + n] = s.token_ids[start:end]
            host["positions"][row : row + n] = np.arange(start, end)
            host["slots"][row : row + n] = _slots(block_ids, start, end, bs).numpy()
            row += n
            if start == 0:
                fresh_lens.append(n)
            else:
                cont_lens_q.append(n)
                cont_lens_k.append(end)
                kv_slots.append(_slots(block_ids, 0, end, bs))
        return fresh_lens, cont_lens_q, cont_lens_k, kv_slots


class _GatheredLayout(KVLayout):
    """Shared by int4 and eviction: [fresh prefills that own their keys] + [sequences with gathered keys]."""

    fresh_prefills_own_keys = False
    window_left: int | None = None

    def __init__(self, cache, kv_manager, device, kv_states: KVStates):
        super().__init__(cache, kv_manager, device)
        self.kv_states = kv_states

    def _write(self, seq: Sequence, row: int, start: int, n: int, table: torch.Tensor) -> SeqWrite | None:
        return None

    @abc.abstractmethod
    def _keys(self, seq: Sequence, start: int, end: int, table: torch.Tensor, write_index: int):
        """(key slots or None, read or None, key positions or None) of a gathered sequence."""

    def _run(self, meta: AttentionMetadata, kv_slots, reads, q_positions, k_positions) -> GatheredRun:
        return GatheredRun(
            meta,
            kv_slots=torch.cat(kv_slots).to(self.device) if kv_slots else None,
            reads=tuple(reads) if reads else None,
        )

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs, dev = self.block_size, self.device
        seqs, counts = _ordered(
            batch, lambda s, n: not (self.fresh_prefills_own_keys and s.num_computed_tokens == 0)
        )
        ids_t, pos_t, slot_t, writes, fresh_lens, lens_q, lens_k = [], [], [], [], [], [], []
        kv_slots, reads, q_positions, k_positions, row = [], [], [], [], 0
        for s, n in zip(seqs, counts):
            start, end = s.num_computed_tokens, s.num_computed_tokens + n
            table = torch.tensor(self.kv.block_ids(s.request_id), dtype=torch.long)
            ids_t.append(torch.tensor(s.token_ids[start:end], dtype=torch.long))
            pos_t.append(torch.arange(start, end))
            slot_t.append(_slots(table, start, end, bs))
            writes.append(self._write(s, row, start, n, table))
            row += n
            if self.fresh_prefills_own_keys and start == 0:
                fresh_lens.append(n)
                continue
            slots, read, key_pos = self._keys(s, start, end, table, len(writes) - 1)
            kv_slots += [slots] if slots is not None else []
            reads += [read] if read is not None else []
            lens_q.append(n)
            lens_k.append(end if key_pos is None else key_pos.numel())
            q_positions.append(torch.arange(start, end))
            k_positions.append(key_pos)
        run = (
            self._run(
                AttentionMetadata.from_seqlens(lens_q, lens_k, device=dev),
                kv_slots,
                reads,
                q_positions,
                k_positions,
            )
            if lens_q
            else None
        )
        gathered = GatheredBatch(
            slot_mapping=torch.cat(slot_t).to(dev),
            num_fresh_tokens=sum(fresh_lens),
            fresh_meta=AttentionMetadata.from_seqlens(fresh_lens, device=dev) if fresh_lens else None,
            gathered=run,
            seq_writes=tuple(writes) if any(w is not None for w in writes) else None,
            window_left=self.window_left,
        )
        meta = AttentionMetadata.from_seqlens(
            counts, [s.num_computed_tokens + n for s, n in zip(seqs, counts)], device=dev
        )
        step = self._inputs(seqs, counts, gathered, meta, ids_t, pos_t)
        step.writes, step.gathered = writes, run
        return step


class Int4Layout(_GatheredLayout):
    fresh_prefills_own_keys = True

    def _write(self, seq, row, start, n, table):
        state = self.kv_states.get(seq.request_id)
        return SeqWrite(
            row,
            row + n,
            start,
            table.to(self.device),
            state.num_quantized,
            self.kv_states.window_slot(seq.request_id),
        )

    def _keys(self, seq, start, end, table, write_index):
        return None, (write_index, end), None  # read [0, end) through its write

    def after_step(self, step: StepInputs) -> None:
        for seq, write in zip(step.seqs, step.writes):
            if seq.status is RequestStatus.RUNNING:
                self.kv_states.get(seq.request_id).num_quantized = write.new_num_quantized


class EvictionLayout(_GatheredLayout):
    evicts = True

    def __init__(self, cache, kv_manager, device, kv_states: KVStates, policy):
        super().__init__(cache, kv_manager, device, kv_states)
        self.policy = policy
        self.window_left = policy.window if isinstance(policy, WindowPolicy) else None

    def _keys(self, seq, start, end, table, write_index):
        held = self.kv_states.get(seq.request_id).held
        key_pos = torch.cat([torch.arange(start) if held is None else held, torch.arange(start, end)])
        return table[key_pos // self.block_size] * self.block_size + key_pos % self.block_size, None, key_pos

    def _run(self, meta, kv_slots, reads, q_positions, k_positions) -> GatheredRun:
        run = super()._run(meta, kv_slots, reads, q_positions, k_positions)
        if self.policy.uses_attention_scores:  # the attention mass each kept key receives, summed per step
            run.query_positions, run.key_positions = tuple(q_positions), tuple(k_positions)
            run.mass = [None] * len(q_positions)
        return run

    def after_step(self, step: StepInputs) -> None:
        """Apply the policy to every request still running: keep its chosen positions, free emptied blocks."""
        for index, (seq, num_new) in enumerate(zip(step.seqs, step.counts)):
            if seq.status is not RequestStatus.RUNNING:
                continue
            state = self.kv_states.get(seq.request_id)
            end = seq.num_computed_tokens
            start = end - num_new
            held = torch.cat(
                [torch.arange(start) if state.held is None else state.held, torch.arange(start, end)]
            )
            scores = None
            if step.gathered is not None and step.gathered.mass is not None:
                scores = accumulate_attention(state.scores, step.gathered.mass[index].cpu())
            plan = self.policy.plan(end, self.block_size, held=held, scores=scores)
            if plan.free_blocks:
                self.kv.evict_blocks(seq.request_id, plan.free_blocks)
            state.held = plan.keep
            state.scores = None if scores is None else scores[plan.keep_index]


def make_layout(
    plan: KVPlan, cache: PagedKVCache, kv_manager: KVCacheManager, device: torch.device, kv_states: KVStates
) -> KVLayout:
    """The layout a KV plan calls for."""
    if plan.policy is not None:
        return EvictionLayout(cache, kv_manager, device, kv_states, plan.policy)
    if plan.quantizer.needs_window:
        return Int4Layout(cache, kv_manager, device, kv_states)
    return PagedLayout(cache, kv_manager, device)
