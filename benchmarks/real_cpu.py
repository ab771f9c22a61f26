"""One-sequence CPU decode of a SmolLM2-135M-shaped model: where the step's time goes, per weight precision.

For fp32, bf16 and int8 weights (random, SmolLM2-135M's shape: 30 layers, hidden 576, 9/3 heads of 64,
vocabulary 49,152): one request with a --prompt-len prompt decodes --steps tokens; reported per precision are
the median decode step (wall and main-thread CPU time), the share of the step spent in matrix products
(torch profiler: aten::mm / addmm / bmm / the int8 kernel) and the rest, ours (attention gathers, rope, norms,
Python per module). Beside it, the bandwidth one (1 x 576) @ (576 x 1536) product reaches in each precision:
a one-token decode reads every weight once, so that bandwidth bounds the step.

    python benchmarks/real_cpu.py --threads 2                 # ~1 minute
    python benchmarks/real_cpu.py --threads 1 --steps 8       # a quick look

Random weights are enough: the step's cost does not depend on their values. The real checkpoint loads through
`load_model` (HF directory or GGUF) where installed; the transformers and llama.cpp columns of the issue's
table are not measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SMOL = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::matmul")


def gemv_gb_per_s(dtype: torch.dtype, reps: int = 300) -> float:
    """Weight bytes per second of one-row products in `dtype` (main-thread CPU time)."""
    x, w = torch.randn(1, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    for _ in range(20):
        torch.nn.functional.linear(x, w)
    start = time.thread_time()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return w.numel() * w.element_size() * reps / (time.thread_time() - start) / 1e9


def _model(precision: str):
    from longreach.config import ModelConfig
    from longreach.model.loader import build_model
    from longreach.model.quant import quantize_model

    torch.manual_seed(0)
    dtype = torch.float32 if precision in ("fp32", "int8") else torch.bfloat16
    model = build_model(ModelConfig.from_hf_dict(SMOL), dtype=dtype, device="cpu")
    if precision == "int8":
        quantize_model(model, "int8")
    return model


def decode(precision: str, prompt_len: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from longreach import LLM, SamplingParams

    llm = LLM(_model(precision), max_model_len=prompt_len + steps + 16, kv_cache_memory=64 * 2**20)
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    engine.add_request([(3 * j + 1) % SMOL["vocab_size"] for j in range(prompt_len)], params)
    engine.step()  # the prefill
    engine.step()
    wall, cpu = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.thread_time()
        engine.step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.thread_time() - c)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return dict(
        precision=precision,
        step_ms=round(1e3 * statistics.median(wall), 2),
        step_cpu_ms=round(1e3 * statistics.median(cpu), 2),
        tokens_per_s=round(1 / statistics.median(wall), 1),
        matmul_share=round(matmul / total, 3),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    bad = [p for p in args.precisions if p not in ("fp32", "bf16", "int8")]
    if bad or args.threads < 1 or args.steps < 1:
        raise SystemExit(f"--precisions {bad} must be fp32/bf16/int8; --threads, --steps >= 1")
    torch.set_num_threads(args.threads)
    print(f"one-row product bandwidth: fp32 {gemv_gb_per_s(torch.float32):.1f} GB/s, "
          f"bf16 {gemv_gb_per_s(torch.bfloat16):.1f} GB/s ({args.threads} threads)")  # fmt: skip
    rows = [decode(p, args.prompt_len, args.steps) for p in args.precisions]
    print("| weights | decode step ms | step CPU ms (main thread) | tok/s | matmul share of CPU |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['step_ms']} | {r['step_cpu_ms']} | {r['tokens_per_s']} | {r['matmul_share']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
