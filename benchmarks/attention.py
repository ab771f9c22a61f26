"""Attention kernels side by side, in one run on one GPU.

Prefill: forward and forward+backward TFLOP/s of longreach's Triton FlashAttention-2 against PyTorch
SDPA's FlashAttention-2 and cuDNN backends and compiled FlexAttention (causal block mask), causal,
bf16, head dim 128, at several sequence lengths with the token count per batch held constant.
FLOPs follow FlashAttention's benchmarks: forward 4 * B * H * N^2 * D, halved for causal; the
backward counts 2.5x the forward.

Decode (Flash-Decoding): paged decode attention, GQA 32/8, batch 8, at 32K and 128K tokens of
context; GB/s counts the K and V cache bytes read. Beside it: a device copy of the same bytes
(counting bytes read and written, the usual copy convention), SDPA over contiguous K/V and our
PyTorch fallback.

Times are CUDA-event medians after warmup. A backend that fails is reported as n/a with its error;
the rest still run. Results go to OUT (default ./out) as attention.md and attention.json, rewritten
after every measurement so a run cut short keeps what it measured.

    python benchmarks/attention.py               # the GPU run (a few minutes on an H100/H200)
    python benchmarks/attention.py --dry-run     # tiny sizes; on CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=os.environ.get("OUT") or "./out", help="results folder (default $OUT or ./out)"
    )
    p.add_argument(
        "--seqlens", type=int, nargs="+", default=[4096, 16384, 65536], help="prefill sequence lengths"
    )
    p.add_argument(
        "--tokens", type=int, default=65536, help="tokens per prefill batch (batch = tokens // seqlen)"
    )
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072], help="decode context lengths")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    p.add_argument("--block-size", type=int, default=16, help="KV cache block (page) size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-reps", type=int, default=20)
    p.add_argument("--skip", nargs="*", default=[], help="backends to leave out, e.g. flex")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new measurements after this many seconds (the rest report n/a)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes and fp16 to exercise the code paths (on CPU: under TRITON_INTERPRET=1)",
    )
    args = p.parse_args(argv)
    if args.dry_run:  # tiny defaults; sizes given on the command line still win
        p.set_defaults(
            seqlens=[64, 128],
            tokens=256,
            heads=2,
            head_dim=32,
            contexts=[200, 600],
            decode_batch=2,
            decode_heads=[4, 2],
            warmup=1,
            reps=1,
            decode_reps=1,
        )
        args = p.parse_args(argv)
    return args


class Bench:
    """Timing, result records and the report files."""

    def __init__(self, args, torch):
        self.args, self.torch = args, torch
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.rows: list[dict] = []
        self.deadline = time.time() + args.budget_s if args.budget_s else None
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if self.cuda else "cpu",
        }
        try:
            import triton

            self.env["triton"] = triton.__version__
        except ImportError as e:
            self.env["triton"] = f"n/a ({e})"

    def time_ms(self, fn, warmup, reps) -> float:
        torch = self.torch
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def measure(self, row: dict, **fns):
        """fns: label -> (callable, work) with work in FLOPs or bytes; records ms and work/s per label."""
        for label, (fn, work) in fns.items():
            if self.deadline is not None and time.time() > self.deadline:
                row[f"{label}_error"] = f"skipped: the {self.args.budget_s:.0f} s time budget was spent"
                break
            try:
                reps = self.args.decode_reps if row["kind"] == "decode" else self.args.reps
                ms = self.time_ms(fn, self.args.warmup, reps)
                row[f"{label}_ms"], row[f"{label}_rate"] = ms, work / (ms * 1e-3)
            except Exception as e:  # a failing peer must not stop the run
                row[f"{label}_error"] = (
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                )
                print(f"  {row['backend']} {label}: n/a ({row[f'{label}_error']})", flush=True)
                break
        self.rows.append(row)
        self.write()
        print("  " + _line(row), flush=True)

    def write(self):
        (self.out / "attention.json").write_text(
            json.dumps({"env": self.env, "args": vars(self.args), "results": self.rows}, indent=1)
        )
        (self.out / "attention.md").write_text(self.markdown())

    def markdown(self) -> str:
        a = self.args
        lines = [f"Device: {self.env['device']}; torch {self.env['torch']}, triton {self.env['triton']}.", ""]
        prefill = [r for r in self.rows if r["kind"] == "prefill"]
        if prefill:
            lines += [
                f"Prefill, causal, {prefill[0]['dtype']}, H={a.heads}, D={a.head_dim}, {a.tokens} tokens per batch "
                "(TFLOP/s; backward counted as 2.5x forward)",
                "",
                "| N | batch | backend | fwd TFLOP/s | fwd+bwd TFLOP/s |",
                "|---|---|---|---|---|",
            ]
            for r in prefill:
                lines.append(
                    f"| {r['n']} | {r['batch']} | {r['backend']} | {_cell(r, 'fwd', 1e12)} | "
                    f"{_cell(r, 'fwdbwd', 1e12)} |"
                )
            lines.append("")
        decode = [r for r in self.rows if r["kind"] == "decode"]
        if decode:
            hq, hkv = a.decode_heads
            lines += [
                f"Decode, {decode[0]['dtype']}, GQA {hq}/{hkv}, batch {a.decode_batch}, D={a.head_dim}, "
                f"block size {a.block_size} (GB/s of K+V cache read; the copy counts read+write)",
                "",
                "| context | backend | ms | GB/s |",
                "|---|---|---|---|",
            ]
            for r in decode:
                ms = f"{r['run_ms']:.3f}" if "run_ms" in r else "n/a"
                lines.append(f"| {r['n']} | {r['backend']} | {ms} | {_cell(r, 'run', 1e9)} |")
            lines.append("")
        errors = [(r["backend"], r["n"], v) for r in self.rows for k, v in r.items() if k.endswith("_error")]
        if errors:
            lines += ["n/a:", ""] + [f"- {b} at {n}: {e}" for b, n, e in errors] + [""]
        return "\n".join(lines)


def _cell(row, label, unit):
    if f"{label}_rate" not in row:
        return "n/a"
    value = row[f"{label}_rate"] / unit
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _line(row):
    parts = [f"{row['kind']} n={row['n']} {row['backend']}:"]
    for label, unit, name in (("fwd", 1e12, "TFLOP/s"), ("fwdbwd", 1e12, "TFLOP/s"), ("run", 1e9, "GB/s")):
        if f"{label}_rate" in row:
            parts.append(f"{label} {row[f'{label}_rate'] / unit:.1f} {name}")
    return " ".join(parts)


def prefill(bench: Bench, dtype):
    torch, a = bench.torch, bench.args
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longreach.attention import triton_flash

    flex = None
    if "flex" not in a.skip and bench.cuda:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # older torch
            flex = e
    h, d = a.heads, a.head_dim
    for n in a.seqlens:
        batch = max(1, a.tokens // n)
        flops = 4 * batch * h * n * n * d / 2
        work = {"fwd": flops, "fwdbwd": 3.5 * flops}
        base = dict(kind="prefill", n=n, batch=batch, heads=h, head_dim=d, dtype=str(dtype)[6:])
        g = torch.Generator(device=bench.device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, device=bench.device, dtype=dtype, generator=g).requires_grad_()

        # ours: THD layout, one document per batch row
        q, k, v = rand(batch * n, h, d), rand(batch * n, h, d), rand(batch * n, h, d)
        dout = torch.randn_like(q)
        cu = torch.arange(0, batch + 1, device=bench.device, dtype=torch.int32) * n

        def ours():
            return triton_flash.varlen_attention(q, k, v, cu, cu, n, n, causal=True)

        _run_pair(bench, dict(base, backend="longreach triton"), ours, (q, k, v), dout, work)
        del q, k, v, dout
        # peers: BHSD layout
        q, k, v = rand(batch, h, n, d), rand(batch, h, n, d), rand(batch, h, n, d)
        dout = torch.randn_like(q)
        for name, backend in (
            ("sdpa flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            if name.split()[1] in a.skip:
                continue

            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            _run_pair(bench, dict(base, backend=name), sdpa, (q, k, v), dout, work)
        if "flex" not in a.skip:
            row = dict(base, backend="flex attention (compiled)")
            if flex is None or isinstance(flex, Exception):
                row["fwd_error"] = f"{flex}" if flex is not None else "benchmarked on CUDA only"
                bench.measure(row)
            else:
                try:
                    mask = create_block_mask(
                        lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device=bench.device
                    )
                    _run_pair(bench, row, lambda: flex(q, k, v, block_mask=mask), (q, k, v), dout, work)
                except Exception as e:
                    row["fwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    bench.measure(row)
        del q, k, v, dout
        if bench.cuda:
            torch.cuda.empty_cache()


def _run_pair(bench, row, forward, inputs, dout, work):
    torch = bench.torch

    def fwd():
        with torch.no_grad():
            forward()

    def fwdbwd():
        torch.autograd.grad(forward(), inputs, dout)

    bench.measure(row, fwd=(fwd, work["fwd"]), fwdbwd=(fwdbwd, work["fwdbwd"]))


def decode(bench: Bench, dtype):
    torch, a = bench.torch, bench.args
    import torch.nn.functional as F

    from longreach.attention import paged

    hq, hkv = a.decode_heads
    batch, d, bs = a.decode_batch, a.head_dim, a.block_size
    for n in a.contexts:
        base = dict(kind="decode", n=n, batch=batch, heads=hq, kv_heads=hkv, head_dim=d, dtype=str(dtype)[6:])
        blocks_per_seq = -(-n // bs)
        num_blocks = batch * blocks_per_seq
        g = torch.Generator(device=bench.device).manual_seed(0)
        k_cache = torch.randn(num_blocks, bs, hkv, d, device=bench.device, dtype=dtype, generator=g)
        v_cache = torch.randn(num_blocks, bs, hkv, d, device=bench.device, dtype=dtype, generator=g)
        table = (
            torch.randperm(num_blocks, device=bench.device, generator=g)
            .view(batch, blocks_per_seq)
            .to(torch.int32)
        )
        seqlens = torch.full((batch,), n, dtype=torch.int32, device=bench.device)
        q = torch.randn(batch, hq, d, device=bench.device, dtype=dtype, generator=g)
        nbytes = 2 * batch * n * hkv * d * k_cache.element_size()
        runs = {
            "longreach triton split-K": lambda: paged.paged_decode_attention(
                q, k_cache, v_cache, table, seqlens
            )
        }
        if not bench.cuda:  # on CPU the dispatcher takes PyTorch: name the interpreted kernel explicitly
            from longreach.attention import triton_decode

            runs["longreach triton split-K"] = lambda: triton_decode.paged_decode_attention(
                q, k_cache, v_cache, table, seqlens
            )
        runs["longreach torch fallback"] = lambda: paged.paged_decode_attention_torch(
            q, k_cache, v_cache, table, seqlens
        )
        for name, fn in runs.items():
            bench.measure(dict(base, backend=name), run=(fn, nbytes))
        k_dst, v_dst = torch.empty_like(k_cache), torch.empty_like(v_cache)

        def copy():
            k_dst.copy_(k_cache)
            v_dst.copy_(v_cache)

        bench.measure(dict(base, backend="device copy (read+write)"), run=(copy, 2 * nbytes))
        del k_dst, v_dst
        try:  # contiguous K/V in SDPA's layout; built from the pages so it holds the same values
            k_flat = (
                k_cache[table.long()]
                .reshape(batch, blocks_per_seq * bs, hkv, d)[:, :n]
                .transpose(1, 2)
                .contiguous()
            )
            v_flat = (
                v_cache[table.long()]
                .reshape(batch, blocks_per_seq * bs, hkv, d)[:, :n]
                .transpose(1, 2)
                .contiguous()
            )
            q4 = q[:, :, None]  # (B, Hq, 1, D)
            sdpa = lambda: F.scaled_dot_product_attention(q4, k_flat, v_flat, enable_gqa=True)  # noqa: E731
            bench.measure(dict(base, backend="sdpa (contiguous KV, enable_gqa)"), run=(sdpa, nbytes))
            del k_flat, v_flat
        except Exception as e:
            bench.measure(
                dict(
                    base,
                    backend="sdpa (contiguous KV, enable_gqa)",
                    run_error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                )
            )
        del k_cache, v_cache
        if bench.cuda:
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    if not torch.cuda.is_available():
        if not args.dry_run:
            print(
                "no CUDA device: run on a GPU, or pass --dry-run to exercise the code at tiny sizes",
                file=sys.stderr,
            )
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import
    bench = Bench(args, torch)
    # the Triton interpreter's bf16 tl.dot is wrong, so a CPU dry run uses fp16
    dtype = torch.bfloat16 if bench.cuda else torch.float16
    t0 = time.time()
    print(f"{bench.env}", flush=True)
    decode(bench, dtype)  # the quick half first: a run cut short still has it
    prefill(bench, dtype)
    print(
        f"\n{bench.markdown()}\nwrote {bench.out / 'attention.md'} and attention.json in {time.time() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
