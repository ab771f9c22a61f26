"""CUDA-graph decode: the model's decode step captured once per (batch bucket, context bucket) and replayed.

A small model's decode step launches hundreds of kernels (a few per layer); on a GPU the host then spends
longer launching them than the GPU spends running them. vLLM, SGLang and nano-vllm capture the decode step in
CUDA graphs so one launch replays them all; this is the same scheme:

- Static input buffers sized for the largest batch and the longest block table (`max_model_len` tokens):
  token ids, positions, slots, the decode block table and key lengths. A graph reads only these.
- Batch buckets 1, 2, 4, 8, ... up to `max_batch`: a step of n decodes replays the smallest bucket >= n with
  rows [n, bucket) padded as empty sequences (slot -1: nothing written; key length 0: a zero output) and
  keeps the first n rows of logits.
- Context buckets: the paged decode kernel sizes its splits from the block table's width, so a graph captured
  at the full `max_model_len` width would give short contexts too few, too long splits. Graphs are therefore
  keyed by the table width too (a power of two of at least `MIN_WIDTH` blocks) and captured lazily, on first
  use, in one shared memory pool.
- Only the model's forward is captured; sampling stays eager (it is per-request Python).

Graphs run only where they can be exact and capturable: a CUDA device, the paged layout (not int4's or an
eviction policy's per-sequence gathers), K/V pages the decode kernel reads as stored (model dtype, int8, or
fp8 on compute capability 8.9+), a RoPE that does not depend on each request's length, no tensor parallelism. Anywhere else, or with
`enforce_eager=True` (vLLM's flag), the engine runs eager and logs why once. A capture that fails
(an operation that syncs with the host, say) turns graphs off with a warning, and the step runs eager.

`DecodeGraphs(..., capture=False)` runs the same padded static-buffer path eagerly: the CPU tests use it to
check the buffer bookkeeping gives the eager engine's tokens.
"""

from __future__ import annotations

import logging

import torch

from longreach.attention import AttentionMetadata
from longreach.attention.paged import FP8_MIN_CAPABILITY
from longreach.engine.layouts import PagedLayout, StepInputs
from longreach.kvcache.paged_cache import PagedBatch, PagedKVCache
from longreach.kvcache.quant import ScaledCodesKV

logger = logging.getLogger(__name__)
MIN_WIDTH = 64  # blocks: the narrowest context bucket (1,024 tokens at block size 16)
MAX_GRAPH_BATCH = 512


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n rows; None when n is larger than every bucket (run eager)."""
    if n < 1:
        raise ValueError(f"a decode step has at least one sequence, got {n}")
    return next((b for b in buckets if b >= n), None)


def width_bucket(width: int, max_width: int) -> int:
    """The context bucket (block-table columns) of a step whose longest table has `width` blocks."""
    if not 1 <= width <= max_width:
        raise ValueError(f"block-table width {width} is outside 1..{max_width}")
    bucket = MIN_WIDTH
    while bucket < width:
        bucket *= 2
    return min(bucket, max_width)


def graph_support(model, layout, cache: PagedKVCache, device: torch.device, parallel=None) -> str | None:
    """None when decode steps can be captured, else the reason they run eager."""
    if device.type != "cuda":
        return f"the model runs on {device.type}, and CUDA graphs capture CUDA kernels"
    if type(layout) is not PagedLayout:
        return f"the {type(layout).__name__} gathers keys per sequence on the host"
    dtype = next(model.parameters()).dtype
    if not (
        isinstance(cache.quantizer, ScaledCodesKV) or (cache.is_plain and cache.k_caches[0].dtype == dtype)
    ):
        return f"{cache.quantizer.name} KV pages are converted on the host before the decode kernel"
    if cache.quantizer.name == "fp8" and torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        return "fp8 KV pages are decoded in PyTorch (host-synchronising) on GPUs below compute capability 8.9"
    if model.config.rope.is_length_dependent:
        return f"rope_type {model.config.rope.rope_type!r} picks its frequencies per request length"
    if parallel is not None:
        return "tensor parallelism's collectives are not captured"
    return None


def is_graphable(step: StepInputs) -> bool:
    """A step of decodes only (one token each, through the paged decode), the model's default RoPE."""
    paged = getattr(step.kwargs["kv_cache"], "batch", None)
    return (
        isinstance(paged, PagedBatch)
        and paged.num_decodes == len(step.seqs) == paged.slot_mapping.shape[0]
        and step.kwargs.get("rope_seq_len") is None
        and step.kwargs.get("logits_indices") is not None
    )


class DecodeGraphs:
    """Static decode inputs, the graphs captured over them and their replay (see the module docstring)."""

    def __init__(
        self, model, cache: PagedKVCache, max_batch: int, max_width: int, device, capture: bool = True
    ):
        if max_width < 1:
            raise ValueError(f"max_width={max_width} must be >= 1 block")
        self.model, self.cache, self.capture = model, cache, capture
        self.max_batch, self.max_width = min(max_batch, MAX_GRAPH_BATCH), max_width
        self.buckets = batch_buckets(self.max_batch)
        self.device = torch.device(device)
        b, dev = self.max_batch, self.device
        self.ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slots = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.table = torch.zeros(b, max_width, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.cu_k = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.disabled: str | None = None  # why graphs were turned off after a failed capture

    def can_run(self, step: StepInputs) -> bool:
        if self.disabled is not None or not is_graphable(step):
            return False
        paged = step.kwargs["kv_cache"].batch
        return len(step.seqs) <= self.max_batch and paged.decode_block_table.shape[1] <= self.max_width

    def load(self, step: StepInputs) -> tuple[int, int]:
        """Copy the step's decode inputs into the static buffers, pad up to its bucket; (bucket, width)."""
        paged, kw = step.kwargs["kv_cache"].batch, step.kwargs
        n, width = len(step.seqs), paged.decode_block_table.shape[1]
        bucket, columns = bucket_for(n, self.buckets), width_bucket(width, self.max_width)
        self.ids[:n].copy_(kw["input_ids"], non_blocking=True)
        self.positions[:n].copy_(kw["positions"], non_blocking=True)
        self.slots[:n].copy_(paged.slot_mapping, non_blocking=True)
        self.table[:n, :width].copy_(paged.decode_block_table, non_blocking=True)
        self.lens[:n].copy_(paged.decode_seqlens, non_blocking=True)
        self.ids[n:bucket].zero_()
        self.positions[n:bucket].zero_()
        self.slots[n:bucket].fill_(-1)  # padding rows write nothing...
        self.lens[n:bucket].zero_()  # ...and see no key
        torch.cumsum(self.lens[:bucket], 0, out=self.cu_k[1 : bucket + 1])
        return bucket, columns

    def forward(self, bucket: int, columns: int) -> torch.Tensor:
        """The model over the static buffers' first `bucket` rows: logits (bucket, V)."""
        paged = PagedBatch(
            slot_mapping=self.slots[:bucket],
            num_decodes=bucket,
            decode_block_table=self.table[:bucket, :columns],
            decode_seqlens=self.lens[:bucket],
            num_fresh_tokens=0,
            fresh_meta=None,
            continued_meta=None,
            continued_kv_slots=None,
        )
        # max_seqlen_k is the bucket's key capacity: a graph cannot read the step's true maximum
        meta = AttentionMetadata(
            self.cu_q[: bucket + 1], self.cu_k[: bucket + 1], 1, columns * self.cache.block_size
        )
        return self.model(
            input_ids=self.ids[:bucket],
            positions=self.positions[:bucket],
            meta=meta,
            kv_cache=self.cache.bind(paged),
        )

    def run(self, step: StepInputs) -> torch.Tensor:
        """The step's logits (rows as `logits_indices` picks them), by graph replay (or eagerly through the
        same buffers with capture=False)."""
        n = len(step.seqs)
        bucket, columns = self.load(step)
        if self.capture:
            graph_out = self.graphs.get((bucket, columns)) or self._capture(bucket, columns)
            if graph_out is not None:
                graph_out[0].replay()
                logits = graph_out[1]
            else:
                logits = self.forward(bucket, columns)
        else:
            logits = self.forward(bucket, columns)
        return logits[:n].index_select(0, step.kwargs["logits_indices"])

    def _capture(self, bucket: int, columns: int):
        """Capture the (bucket, columns) graph over the loaded inputs; None (graphs off) if it fails."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes outside the capture
                for _ in range(2):
                    self.forward(bucket, columns)  # writes the loaded step's K/V: the same values again
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.forward(bucket, columns)
        except Exception as exc:  # a host sync or an uncapturable op: eager from now on, said once
            self.disabled = f"{type(exc).__name__}: {exc}"
            logger.warning("CUDA-graph capture failed (%s); decode runs eager", self.disabled)
            return None
        self.graphs[(bucket, columns)] = (graph, out)
        logger.info("captured the decode step for batch %d, %d-block tables", bucket, columns)
        return graph, out


def make_decode_graphs(
    model, layout, cache: PagedKVCache, scheduler_config, device, parallel=None
) -> DecodeGraphs | None:
    """The engine's decode graphs, or None (eager) with the reason logged once."""
    device = torch.device(device)
    if scheduler_config.enforce_eager:
        reason = "enforce_eager=True"
    else:
        reason = graph_support(model, layout, cache, device, parallel)
    if reason is not None:
        logger.info("CUDA-graph decode off: %s; decode steps run eager", reason)
        return None
    max_width = -(-scheduler_config.max_model_len // cache.block_size)
    graphs = DecodeGraphs(model, cache, scheduler_config.max_num_seqs, max_width, device)
    logger.info(
        "CUDA-graph decode on: batch buckets %s, tables up to %d blocks (captured on first use)",
        graphs.buckets,
        max_width,
    )
    return graphs
