"""One layer's paged decode per KV dtype, timed alone: the read cost of each storage (docs/tradeoffs.md).

The engine-level decode figures of `benchmarks/tradeoffs.py` include the model and the scheduler and move
with whatever else the machine runs; this times only `PagedKVCache.decode` (gather, dequantize, attend) over
the same pages, the dtypes alternating round by round so drift hits them alike, and prints the median.

    python benchmarks/kv_decode_op.py                      # 4 sequences x 4,096 tokens, demo-model heads
    python benchmarks/kv_decode_op.py --dtypes int8,fp8 --length 16384 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from longreach.kvcache.paged_cache import PagedKVCache
from longreach.kvcache.quant import make_kv_quantizer


def build(dtype: str, args) -> tuple:
    """A one-layer cache in `dtype` holding `batch` sequences of `length` random tokens, and its decode call."""
    num_blocks = args.batch * args.length // args.block_size
    quantizer = make_kv_quantizer(dtype, torch.float32)
    cache = PagedKVCache(1, num_blocks, args.block_size, args.kv_heads, args.head_dim, quantizer=quantizer)
    g = torch.Generator().manual_seed(0)
    shape = (num_blocks * args.block_size, args.kv_heads, args.head_dim)
    slots = torch.arange(shape[0])
    cache.write_slots(
        cache.stores[0], torch.randn(shape, generator=g), torch.randn(shape, generator=g), slots
    )
    table = torch.arange(num_blocks, dtype=torch.int32).view(args.batch, -1)
    lengths = torch.full((args.batch,), args.length, dtype=torch.int32)
    q = torch.randn(args.batch, args.heads, args.head_dim, generator=g)
    return lambda: cache.decode(cache.stores[0], q, table, lengths, (-1, -1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,int8,fp8", help="KV dtypes (fp32 queries, as on CPU)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--heads", type=int, default=4, help="query heads (demo model: 4)")
    parser.add_argument("--kv-heads", type=int, default=2, help="KV heads (demo model: 2)")
    parser.add_argument("--head-dim", type=int, default=32, help="head dim (demo model: 32)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is printed")
    parser.add_argument("--calls", type=int, default=10, help="decode calls timed per round")
    args = parser.parse_args(argv)
    calls = {dtype: build(dtype, args) for dtype in args.dtypes.split(",")}
    times = {dtype: [] for dtype in calls}
    for fn in calls.values():
        fn()  # warm the gather buffers
    for _ in range(args.rounds):
        for dtype, fn in calls.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[dtype].append((time.perf_counter() - start) / args.calls * 1e3)
    print(
        f"{args.batch} x {args.length:,} tokens, {torch.get_num_threads()} threads, median of {args.rounds}:"
    )
    for dtype, samples in times.items():
        print(
            f"  {dtype:>5}: {statistics.median(samples):6.1f} ms per layer  (rounds: "
            + ", ".join(f"{t:.1f}" for t in samples)
            + ")"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
