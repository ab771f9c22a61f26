"""The batched sampler (vLLM v1's semantics; the parameters are `sampling_params.SamplingParams`).

Order, as in vLLM: logprobs of the raw model distribution are recorded first; then repetition penalty
(Hugging Face's rule over prompt and output: positive logits divided, negative multiplied), frequency
and presence penalties (OpenAI's, over output tokens), `min_tokens` (EOS and stop ids masked), then
greedy rows take the argmax and the others apply temperature, min-p, top-k and top-p and sample.
Sampling is an exponential race (argmax of p / Exp(1) noise), drawn row by row from the request's own
`torch.Generator` when it has a seed, so a seeded request gives the same tokens in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from longreach.engine.sampling_params import SamplingParams
from longreach.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: {token id: logprob} for the sampled + top-k tokens


def apply_penalties(logits: torch.Tensor, seqs: Seq["Sequence"]) -> None:
    """In place on logits (B, V), only for rows whose request asks for penalties."""
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        p = seq.sampling_params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.token_ids, device=logits.device).unique()
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        outputs = seq.output_token_ids
        if outputs and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(outputs), minlength=vocab).to(logits.device, logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p (B,) times the row's top probability."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep the top_k (B,) largest logits and the smallest set whose probability reaches top_p (B,).

    One ascending sort serves both (vLLM's apply_top_k_top_p); ties with the k-th logit are kept."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending, (B, V)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k.clamp(1, vocab)).unsqueeze(1))  # (B, 1)
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the top token always stays
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    """Turns the last-position logits of a batch of requests into one token each."""

    def __init__(self, eos_token_ids: Seq[int] = (), seed: int | None = 0):
        self.eos_token_ids = tuple(eos_token_ids)
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, seqs: Seq["Sequence"]) -> SamplerOutput:
        """logits: (B, V), row b for seqs[b]."""
        logits = logits.float()
        params = [s.sampling_params for s in seqs]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = logits.log_softmax(-1)
        if any(p.has_penalties or s.num_output_tokens < p.min_tokens for p, s in zip(params, seqs)):
            logits = logits.clone()  # edited in place below; the caller's tensor is kept
            apply_penalties(logits, seqs)
            self._mask_early_stops(logits, seqs)
        token_ids = logits.argmax(-1)
        sampled_rows = [b for b, p in enumerate(params) if not p.is_greedy]
        if sampled_rows:
            token_ids[sampled_rows] = self._sample(logits[sampled_rows], [seqs[b] for b in sampled_rows])
        ids = token_ids.tolist()
        return SamplerOutput(ids, self._logprobs(raw_logprobs, ids, params))

    def _mask_early_stops(self, logits: torch.Tensor, seqs: Seq["Sequence"]) -> None:
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                if banned:
                    logits[row, banned] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list["Sequence"]) -> torch.Tensor:
        params = [s.sampling_params for s in seqs]
        device = logits.device
        logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))
        top_k = top_p = None
        if any(p.top_k is not None for p in params):
            top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params], device=device)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device)
        if top_k is not None or top_p is not None:
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(-1)
        noise = torch.empty(probs.shape, dtype=torch.float32)  # Exp(1), drawn on the CPU
        unseeded = [b for b, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[-1]).exponential_(
                generator=self.generator
            )
        for b, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[b].exponential_(generator=seq.generator)
        return (probs / noise.to(device)).argmax(-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, ids: list[int], params: list[SamplingParams]):
        if raw is None:
            return [None] * len(ids)
        out: list[dict[int, float] | None] = []
        for row, (token, p) in enumerate(zip(ids, params)):
            if p.logprobs is None:
                out.append(None)
                continue
            entry = {token: raw[row, token].item()}
            if p.logprobs:
                values, indices = raw[row].topk(p.logprobs)
                entry.update(zip(indices.tolist(), values.tolist()))
            out.append(entry)
        return out
