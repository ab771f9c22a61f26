"""Paged decode bandwidth with the KV cache in bf16, int8 and int4 (int4 dequantized inside the Triton kernel).

Per case: B sequences of L tokens each, Hq/Hkv heads of D, one query each. Time per call (CUDA events, median
of --iters) and the bytes the kernel must read (codes, scales, int4's minimums and window) over that time, the
effective bandwidth; beside it the bytes a bf16 cache would need, so the saving shows as time, not only size.

    python benchmarks/int4_decode.py --out out/            # GPU: batch 8, 32K and 128K, Hq 32 / Hkv 8, D 128
    python benchmarks/int4_decode.py --rehearse            # CPU, under TRITON_INTERPRET=1, toy sizes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _time(fn, iters: int, device) -> float:
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _int4_case(batch, length, num_kv_heads, head_dim, device, q):
    """An int4 store filled by Int4KV.write per sequence, and the decode call over it."""
    from longreach.attention.triton_decode_int4 import paged_decode_attention_int4
    from longreach.kvcache.quant import Int4KV

    quant, block_size = Int4KV(), 32
    per_seq = -(-length // block_size)
    store = quant.allocate(batch * per_seq, block_size, num_kv_heads, head_dim, batch, device)
    table = torch.arange(batch * per_seq, device=device, dtype=torch.int32).view(batch, per_seq)
    nq = []
    for b in range(batch):
        k = torch.randn(length, num_kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        nq.append(quant.write(store, k, torch.randn_like(k), table[b].long(), 0, 0, b))
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    lens, nq_t, slots = i32([length] * batch), i32(nq), i32(list(range(batch)))
    read = sum(t.numel() * t.element_size() for name, t in store.items() if "window" not in name)
    read += batch * (length - min(nq)) * 2 * num_kv_heads * head_dim * 2  # the window's bf16 tokens
    return (lambda: paged_decode_attention_int4(q, store, table, lens, nq_t, slots)), read


def measure(batch, length, num_heads, num_kv_heads, head_dim, iters, device) -> list[dict]:
    from longreach.attention import triton_decode
    from longreach.kvcache.codecs import quantize_int8

    block_size = 16
    blocks = batch * -(-length // block_size)
    q = torch.randn(batch, num_heads, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(blocks, block_size, num_kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.arange(blocks, device=device, dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), length, device=device, dtype=torch.int32)
    (kc, ks), (vc, vs) = quantize_int8(k), quantize_int8(v)
    bf16_bytes = 2 * k.numel() * 2
    cases = {
        "bf16": (lambda: triton_decode.paged_decode_attention(q, k, v, table, lens), bf16_bytes),
        "int8": (
            lambda: triton_decode.paged_decode_attention(q, kc, vc, table, lens, k_scale=ks, v_scale=vs),
            2 * (kc.numel() + ks.numel() * 2),
        ),
        "int4": _int4_case(batch, length, num_kv_heads, head_dim, device, q),
    }
    rows = []
    for name, (fn, nbytes) in cases.items():
        seconds = _time(fn, iters, device)
        rows.append(dict(kv=name, batch=batch, context=length, us=round(seconds * 1e6, 1),
                         bytes_read=nbytes, gb_per_s=round(nbytes / seconds / 1e9, 1),
                         bf16_bytes=bf16_bytes))  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("int4_decode.py needs a GPU; --rehearse runs it under TRITON_INTERPRET=1")
    device = torch.device("cpu" if args.rehearse else "cuda")
    batch, heads, kv_heads, dim = (1, 4, 2, 32) if args.rehearse else (8, 32, 8, 128)
    rows = []
    print("| KV | batch | context | us per call | bytes read | GB/s | bf16 bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for length in args.contexts or ([64] if args.rehearse else [32768, 131072]):
        for row in measure(batch, length, heads, kv_heads, dim, args.iters, device):
            rows.append(row)
            print(" | ".join(["", *(str(v) for v in row.values()), ""]).strip(), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "int4_decode.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
