"""Prometheus metrics of one server (names follow vLLM's, with a `longreach_` prefix).

Gauges describe the engine now (requests running / waiting, KV blocks and bytes used); counters and histograms
accumulate over the server's life (tokens in and out, preemptions, prefix-cache lookups, time to first
token, time per output token). Everything is written by the engine thread and read by `/metrics`;
prometheus_client's metrics are thread-safe. Each server owns its registry, so several can share a process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from longreach.engine.llm import LLMEngine, RequestOutput

PREFIX = "longreach_"
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
    1280.0,
)


class ServerMetrics:
    def __init__(self, num_kv_blocks: int):
        self.registry = CollectorRegistry()
        self._add_engine_gauges(self.registry)
        self._add_request_metrics(self.registry)
        self.kv_blocks_total.set(num_kv_blocks)
        self._num_preemptions_seen = 0
        self._hits = self._queries = 0

    def _add_engine_gauges(self, r: CollectorRegistry) -> None:
        """What the engine holds now: queue lengths, KV blocks and bytes, prefix-cache traffic, preemptions."""
        p = PREFIX
        self.num_requests_running = Gauge(
            p + "num_requests_running", "Requests in the running batch", registry=r
        )
        self.num_requests_waiting = Gauge(
            p + "num_requests_waiting", "Requests waiting to be scheduled (new or preempted)", registry=r
        )
        self.kv_blocks_total = Gauge(p + "kv_cache_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.kv_blocks_used = Gauge(
            p + "kv_cache_blocks_used", "KV-cache blocks held by requests", registry=r
        )
        self.kv_bytes_used = Gauge(
            p + "kv_cache_bytes_used",
            "KV-cache bytes held by requests: blocks (data and scales) plus int4 window slots in use",
            registry=r,
        )
        self.kv_bytes_total = Gauge(p + "kv_cache_bytes_total", "KV-cache bytes allocated", registry=r)
        self.kv_usage = Gauge(
            p + "kv_cache_usage_percent", "KV-cache blocks held by requests, percent of the pool", registry=r
        )
        self.prefix_queries = Counter(
            p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            p + "prefix_cache_hits", "Prompt tokens served from the prefix cache", registry=r
        )
        self.prefix_hit_rate = Gauge(
            p + "prefix_cache_hit_rate",
            "prefix_cache_hits / prefix_cache_queries since the server started",
            registry=r,
        )
        self.preemptions = Counter(
            p + "num_preemptions", "Requests preempted (KV blocks freed, recomputed later)", registry=r
        )

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Per finished request: tokens, finish reasons, latency histograms."""
        p = PREFIX
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", registry=r)
        self.requests_finished = Counter(
            p + "request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from arrival to the first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            p + "e2e_request_latency_seconds",
            "Time from arrival to the last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def update_engine_state(self, engine: "LLMEngine") -> None:
        """Gauges from the engine's scheduler and block pool; called by the engine thread after each step."""
        scheduler, kv = engine.scheduler, engine.kv_manager
        self.num_requests_running.set(len(scheduler.running))
        self.num_requests_waiting.set(len(scheduler.waiting))
        used = kv.num_blocks - kv.num_free_blocks
        self.kv_blocks_used.set(used)
        self.kv_usage.set(100.0 * used / kv.num_blocks)
        self.kv_bytes_used.set(engine.kv_cache_bytes_used)
        self.kv_bytes_total.set(engine.kv_cache_bytes_total)
        if scheduler.num_preemptions > self._num_preemptions_seen:
            self.preemptions.inc(scheduler.num_preemptions - self._num_preemptions_seen)
            self._num_preemptions_seen = scheduler.num_preemptions

    def record_output(self, out: "RequestOutput") -> None:
        """Token counts and latencies of one step's output of one request."""
        m = out.metrics
        num_new = len(out.delta_token_ids)
        if num_new:
            self.generation_tokens.inc(num_new)
            if len(out.token_ids) == num_new and m.ttft is not None:  # the request's first token(s)
                self.ttft.observe(m.ttft)
        if not out.finished:
            return
        self.requests_finished.labels(out.finish_reason).inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        if m.first_scheduled_time is not None:  # it reached the prefix cache
            self._queries += len(out.prompt_token_ids)
            self._hits += m.num_cached_tokens
            self.prefix_queries.inc(len(out.prompt_token_ids))
            self.prefix_hits.inc(m.num_cached_tokens)
            self.prefix_hit_rate.set(self._hits / self._queries if self._queries else 0.0)
        if m.num_generated_tokens >= 2 and m.last_token_time is not None and m.first_token_time is not None:
            self.tpot.observe((m.last_token_time - m.first_token_time) / (m.num_generated_tokens - 1))
        if m.last_token_time is not None:
            self.e2e_latency.observe(m.last_token_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
