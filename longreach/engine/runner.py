"""Turns a scheduled step into one flat forward pass (vLLM's GPU model runner, nano-vllm's ModelRunner).

All scheduled requests go through the model together as one `(T,)` token batch. How their tokens address
the KV cache (slots, block tables, which keys each sequence attends) is the layout's business
(`engine/layouts.py`: paged, int4, eviction), chosen once per engine; the runner adds what every layout
shares: each token's RoPE table length (its own request's, never the batch's) and the per-request KV peaks.
"""

from __future__ import annotations

import torch

from longreach.engine.layouts import KVLayout, StepInputs
from longreach.engine.prompt_logprobs import PromptLogprobs
from longreach.engine.scheduler import ScheduledBatch
from longreach.engine.sequence import Sequence
from longreach.kvcache.block_pool import KVCacheManager
from longreach.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        layout: KVLayout,
        kv_manager: KVCacheManager,
        block_bytes: int,
        window_slot_bytes: int = 0,
        graphs=None,
    ):
        """graphs: a `cuda_graphs.DecodeGraphs` that runs decode-only steps it can run, else None (eager)."""
        self.model, self.layout, self.kv = model, layout, kv_manager
        self.graphs = graphs
        self.device = next(model.parameters()).device
        self.block_bytes, self.window_slot_bytes = block_bytes, window_slot_bytes
        self.is_rope_length_dependent = model.config.rope.is_length_dependent
        self.prompt_logprobs = PromptLogprobs()  # the requests that asked for them, and what is recorded

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's model inputs (the layout's, plus per-token RoPE lengths)."""
        step = self.layout.prepare(batch)
        step.kwargs["rope_seq_len"] = self._rope_lengths(step.seqs, step.counts)
        return step

    def _rope_lengths(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor | None:
        """(T,) per-token RoPE table lengths, each its own request's (fixed at admission), for length-dependent
        rope types; None otherwise. Never the batch's longest position: that would make a request's rotation
        depend on its neighbours and its chunking."""
        if not self.is_rope_length_dependent:
            return None
        lengths = torch.tensor([s.rope_seq_len for s in seqs], dtype=torch.long)
        return torch.repeat_interleave(lengths, torch.tensor(counts)).to(self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[StepInputs, torch.Tensor]:
        """Run one step. Returns its inputs (their `sampling` sequences in logits row order) and the logits (n, V).

        Requests that asked for prompt logprobs get logits at their prompt positions too; those are recorded
        in `self.prompt_logprobs` here and not returned."""
        step = self.prepare(batch)
        prompt_rows = self.prompt_logprobs.plan(step.seqs, step.counts)
        if prompt_rows is not None:
            extra = torch.tensor(prompt_rows.rows, dtype=torch.long, device=self.device)
            step.kwargs["logits_indices"] = torch.cat([step.kwargs["logits_indices"], extra])
        if self.graphs is not None and self.graphs.can_run(step):
            logits = self.graphs.run(step)  # decode-only: replayed (padded to its bucket)
        else:
            logits = self.model(**step.kwargs)
        if prompt_rows is not None:
            num_sampling = len(step.sampling)
            self.prompt_logprobs.record(logits[num_sampling:], prompt_rows)
            logits = logits[:num_sampling]
        tables, evicts = self.kv.tables, self.layout.evicts
        for seq in batch.seqs:  # the step's peak: its new tokens are stored, nothing evicted yet
            # without eviction every table entry is held: its length, not a count over it (O(blocks) a step)
            rid = seq.request_id
            num_blocks = self.kv.num_held_blocks(rid) if evicts else len(tables.get(rid, ()))
            seq.metrics.max_kv_blocks = max(seq.metrics.max_kv_blocks, num_blocks)
            seq.metrics.max_kv_bytes = max(
                seq.metrics.max_kv_bytes, num_blocks * self.block_bytes + self.window_slot_bytes
            )
        return step, logits

    def after_step(self, step: StepInputs) -> None:
        """After the scheduler advanced the step's requests: the layout's bookkeeping (int4 counts, eviction)."""
        self.layout.after_step(step)
