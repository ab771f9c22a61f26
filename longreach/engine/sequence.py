"""One request's state as it moves through the engine (vLLM v1's `Request`, nano-vllm's `Sequence`).

A request is its token ids (prompt, then outputs) and `num_computed_tokens`: how many of them have
K/V in the cache. The scheduler only ever catches `num_computed_tokens` up to `num_tokens`, which is
all that prefill, chunked prefill, decode, prefix hits and recompute-after-preemption are.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from longreach.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not started, or preempted (its blocks freed; it is recomputed when resumed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.perf_counter) and counters of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0  # sampled tokens (recomputed ones after a preemption not counted twice)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the first admission
    num_preemptions: int = 0
    max_kv_blocks: int = 0  # most KV blocks the request held at once (after a step's writes)
    max_kv_bytes: int = 0  # the same in bytes, scales and int4's window slot included

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds since the request arrived."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second of decoding (None with fewer than two tokens)."""
        if self.num_generated_tokens < 2 or self.last_token_time == self.first_token_time:
            return None
        return (self.num_generated_tokens - 1) / (self.last_token_time - self.first_token_time)


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    cache_salt: str | None = None
    rope_seq_len: int | None = None  # the length its RoPE tables are chosen for, fixed for its lifetime
    arrival_time: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" (OpenAI's names); output.py writes it
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None
    generator: torch.Generator | None = None
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)

    @property
    def block_hash_salt(self) -> str | None:
        """What besides its tokens decides a block's K/V: the client's cache salt and, for length-dependent
        RoPE, the request's table length (a short-table block must never serve a long-table request)."""
        if self.rope_seq_len is None:
            return self.cache_salt
        return f"{self.cache_salt or ''}\0rope:{self.rope_seq_len}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        self.metrics.num_generated_tokens += 1
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
