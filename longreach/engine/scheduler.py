"""Continuous-batching scheduler without prefill/decode phases (vLLM v1's scheduler).

Each step has a token budget (`max_num_batched_tokens`). Running requests are served first, in arrival
order, each catching its `num_computed_tokens` up to its `num_tokens` as far as the budget allows: a decode
takes one token, a long prompt takes what is left (chunked prefill). Then waiting requests are admitted in
arrival order (FCFS) while budget, `max_num_seqs` and KV blocks last; an admitted request first takes the
longest cached prefix of its tokens (prefix-cache hit) and only computes the rest.

When a running request needs a block and none is free, the newest running request is preempted by
recompute: its blocks are freed, its computed count reset, and it goes back to the front of the queue with
its prompt and the tokens it has generated so far, to be recomputed (often from the prefix cache) later.
No request is lost, and no waiting request is admitted in a step that preempted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from longreach.config import SchedulerConfig
from longreach.engine.sequence import RequestStatus, Sequence
from longreach.kvcache.block_pool import KVCacheManager


@dataclass
class ScheduledBatch:
    """One step's work: seqs[i] computes its next num_new_tokens[i] tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that catch up to their full length this step, hence sample a token (in batch order)."""
        return [
            s for s, n in zip(self.seqs, self.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens
        ]


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv_manager: KVCacheManager):
        self.cfg = cfg
        self.kv = kv_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.cfg.max_num_batched_tokens
        now = time.perf_counter()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(
                seq.request_id, seq.token_ids, seq.num_computed_tokens, num_new, salt=seq.block_hash_salt
            ):
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not RequestStatus.RUNNING:
                break  # it preempted itself: it was the last one
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        while (
            not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs
        ):
            seq = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(
                seq.request_id, seq.token_ids, seq.block_hash_salt
            )
            if seq.sampling_params.prompt_logprobs is not None:  # every prompt position's logits are needed
                hits, num_hit_tokens = [], 0  # (vLLM's rule too)
            num_new = seq.num_tokens - num_hit_tokens
            if num_new > budget:
                if not self.cfg.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(
                seq.request_id, seq.token_ids, num_hit_tokens, num_new, hits, salt=seq.block_hash_salt
            ):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = RequestStatus.RUNNING
            seq.num_computed_tokens = num_hit_tokens
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
                seq.metrics.num_cached_tokens = num_hit_tokens
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.request_id)
        seq.status = RequestStatus.WAITING
        seq.num_computed_tokens = 0
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def requeue(self, batch: ScheduledBatch) -> None:
        """Undo a step whose forward pass failed: its requests free their blocks and go back to the front of
        the queue, in the same order, to be recomputed from their tokens (as after a preemption, but not
        counted as one). Their tokens so far are kept and nothing was sampled, so a retry is exact."""
        for seq in reversed(batch.seqs):
            if seq.is_finished:
                continue
            if seq.status is RequestStatus.RUNNING:
                self.running.remove(seq)
            self.kv.free(seq.request_id)
            seq.status = RequestStatus.WAITING
            seq.num_computed_tokens = 0
            self.waiting.appendleft(seq)

    def update(
        self,
        batch: ScheduledBatch,
        sampling_seqs: Seq[Sequence],
        token_ids: Seq[int],
        logprobs: Seq[dict[int, float] | None],
    ) -> None:
        """Advance computed counts and append the sampled tokens (stop conditions are output.py's)."""
        now = time.perf_counter()
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
        for seq, token, lp in zip(sampling_seqs, token_ids, logprobs):
            seq.append_token(token, lp)
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            seq.metrics.last_token_time = now

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted request and free its blocks; a no-op if it already finished."""
        if seq.is_finished:
            return
        if seq.status is RequestStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.forget(seq.request_id)
        seq.status = RequestStatus.FINISHED
        seq.metrics.finished_time = time.perf_counter()
