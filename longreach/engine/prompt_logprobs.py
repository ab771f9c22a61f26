"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): for each prompt token, its log-softmax (fp32) given
the tokens before it, plus the k likeliest tokens at that position; the first token has none (None), as in vLLM.

The runner computes logits only at each request's last position unless a request asks for these: then every
prompt position it computes in a step gets a logits row too (position p's row scores token p + 1), chunk by
chunk under chunked prefill. A prefix-cache hit would skip positions whose logits are needed, so such requests
never read the prefix cache (vLLM's rule in `KVCacheManager.get_computed_blocks`; the scheduler applies it).
After a preemption or a failed step a request recomputes from its first token; positions already recorded
keep their first values, so each prompt token is recorded exactly once whatever the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from longreach.engine.sequence import Sequence


@dataclass(frozen=True)
class PromptRows:
    """The extra logits rows of one step: `rows` index its flat token batch; `spans[i]` = (request, index of
    the first prompt token its rows score, number of rows), in row order."""

    rows: list[int]
    spans: list[tuple[Sequence, int, int]]


class PromptLogprobs:
    """Per request that asks for prompt logprobs: the entries recorded so far, one per prompt token."""

    def __init__(self):
        self._entries: dict[str, list[dict[int, float] | None]] = {}

    def add(self, seq: Sequence) -> None:
        if seq.sampling_params.prompt_logprobs is not None:
            self._entries[seq.request_id] = [None]  # the first token has no prefix to be scored against

    def get(self, request_id: str) -> list[dict[int, float] | None] | None:
        """The entries so far (complete once the request has sampled its first token); None if not asked."""
        return self._entries.get(request_id)

    def pop(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def plan(self, seqs: Seq[Sequence], counts: Seq[int]) -> PromptRows | None:
        """Which rows of a step (sequences in row order, `counts` new tokens each) score prompt tokens not yet
        recorded; None when no request in the step needs any."""
        if not self._entries:
            return None
        rows: list[int] = []
        spans: list[tuple[Sequence, int, int]] = []
        row = 0
        for seq, n in zip(seqs, counts):
            entries = self._entries.get(seq.request_id)
            if entries is not None:
                start = seq.num_computed_tokens
                if start > len(entries) - 1 and len(entries) < seq.num_prompt_tokens:
                    raise RuntimeError(
                        f"request {seq.request_id!r} starts computing at position {start} but its prompt "
                        f"logprobs reach only {len(entries) - 1}: positions were skipped (a prefix-cache hit?)"
                    )
                first = max(start, len(entries) - 1)  # position p scores token p + 1
                end = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt position samples
                if end > first:
                    rows.extend(range(row + first - start, row + end - start))
                    spans.append((seq, first + 1, end - first))
            row += n
        return PromptRows(rows, spans) if rows else None

    def record(self, logits: torch.Tensor, plan: PromptRows) -> None:
        """Store the entries of `plan`'s rows; logits (len(plan.rows), V), in the plan's row order."""
        logprobs = logits.float().log_softmax(-1)  # (R, V), fp32 whatever the model's dtype
        offset = 0
        for seq, first, count in plan.spans:
            entries = self._entries[seq.request_id]
            rows = logprobs[offset : offset + count]  # (count, V)
            offset += count
            targets = seq.prompt_token_ids[first : first + count]
            chosen = rows.gather(1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
            k = min(seq.sampling_params.prompt_logprobs, rows.shape[-1])
            top_values, top_ids = rows.topk(k)  # k = 0: empty
            for token, value, ids, values in zip(targets, chosen, top_ids.tolist(), top_values.tolist()):
                entry = dict(zip(ids, values))
                entry[token] = value
                entries.append(entry)
