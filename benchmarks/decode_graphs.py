"""Decode step time, eager vs CUDA graphs (engine/cuda_graphs.py), and whether their tokens are identical.

For each batch size and context length: `batch` requests whose prompts share a `context`-token prefix (a
prefix-cache hit, so the prefill is cheap and every request holds the whole context), decoded greedily for
`--steps` tokens by two engines over the same weights, one with `enforce_eager=True`. Reports the median decode
step time of each (the engine's whole step: schedule, inputs, forward, sampling), their ratio, the roofline
time of the step (weight bytes + the KV bytes it reads, over --bandwidth) and whether every request's tokens are
identical. The model is SmolLM2-135M-shaped (30 layers: many small kernels per step), random weights, bf16.

    python benchmarks/decode_graphs.py --out out/           # GPU: batch 1, 8, 64 at 4K and 32K context
    python benchmarks/decode_graphs.py --rehearse           # CPU: graphs are off there, so the 'graphs' arm
                                                            # runs the static-buffer path eagerly (capture=False)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

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
)
TOY = dict(SMOL, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(model, batch: int, context: int, steps: int, eager: bool, rehearse: bool):
    """(decode step seconds, every request's tokens) for one engine."""
    from longreach import LLM, SamplingParams
    from longreach.engine.cuda_graphs import DecodeGraphs

    device = next(model.parameters()).device
    llm = LLM(
        model,
        max_model_len=context + steps + 32,
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, context + 16),
        enforce_eager=eager,
        memory_fraction=0.5 if device.type == "cuda" else None,
        kv_cache_memory=None if device.type == "cuda" else 256 * 2**20,
    )
    engine = llm.engine
    if rehearse and not eager:  # no CUDA: the same static buffers, run eagerly
        max_width = -(-engine.scheduler_config.max_model_len // engine.kv_manager.block_size)
        engine.runner.graphs = DecodeGraphs(model, engine.cache, batch, max_width, device, capture=False)
    vocab = model.config.vocab_size
    prefix = [(3 * j + 1) % vocab for j in range(context)]
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    ids = [engine.add_request(prefix + [(5 * i + 7) % vocab], params) for i in range(batch)]
    tokens, times = {}, []
    while engine.has_unfinished_requests():
        decoding = all(s.num_output_tokens for s in engine.requests.values())
        _sync(device)
        start = time.perf_counter()
        outs = engine.step()
        _sync(device)
        if decoding:
            times.append(time.perf_counter() - start)
        tokens.update({o.request_id: o.token_ids for o in outs if o.finished})
    del llm, engine
    gc.collect()  # the next engine takes its own share of the free memory: free this one's cache first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times, [tokens[i] for i in ids]


def roofline_ms(model, batch: int, context: int, bandwidth: float) -> float:
    """Weights once plus every sequence's K/V (model dtype), over `bandwidth` bytes/s."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    kv = batch * context * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    return 1e3 * (weights + kv) / bandwidth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 64 (rehearse 1 3)")
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=None, help="default 4096 32768 (rehearse 64)"
    )
    parser.add_argument("--steps", type=int, default=None, help="decoded tokens per request (default 48)")
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the roofline (H200)")
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rehearse = args.rehearse
    if not rehearse and not torch.cuda.is_available():
        raise SystemExit(
            "decode_graphs.py measures CUDA graphs on a GPU; --rehearse runs its code path on CPU"
        )
    from longreach.config import ModelConfig
    from longreach.model.loader import build_model

    batches = args.batches or ([1, 3] if rehearse else [1, 8, 64])
    contexts = args.contexts or ([64] if rehearse else [4096, 32768])
    steps = args.steps or (6 if rehearse else 48)
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(
        {**(TOY if rehearse else SMOL), "max_position_embeddings": max(contexts) + 512}
    )
    model = build_model(cfg, dtype=torch.bfloat16, device="cpu" if rehearse else "cuda")
    rows = []
    print(
        "| batch | context | eager step ms | graph step ms | eager / graph | roofline ms | tokens identical |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for context in contexts:
        for batch in batches:
            eager_t, eager_tok = run_engine(model, batch, context, steps, True, rehearse)
            graph_t, graph_tok = run_engine(model, batch, context, steps, False, rehearse)
            e, g = 1e3 * statistics.median(eager_t), 1e3 * statistics.median(graph_t)
            row = dict(batch=batch, context=context, eager_ms=round(e, 3), graph_ms=round(g, 3),
                       speedup=round(e / g, 2), roofline_ms=round(roofline_ms(model, batch, context, args.bandwidth), 3),
                       identical=eager_tok == graph_tok)  # fmt: skip
            rows.append(row)
            print(" | ".join(["", *(str(v) for v in row.values()), ""]).strip(), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "decode_graphs.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
