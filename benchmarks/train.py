"""Training throughput and memory, in one run.

CPU (default):
  1. packed vs padded: the same model trained on the same length-skewed corpus (log-normal document
     lengths), one mode's step after the other's so machine load hits both alike; real (non-padding)
     tokens per second and the share of computed tokens that are padding. The padded baseline pads each
     batch to its longest document (transformers' DataCollatorWithPadding; the trainer's `trim_padding`),
     not to seq_len. Target: packed >= 1.5x.
  2. activation checkpointing: peak memory growth (RSS high-water mark, a fresh process per setting) and
     time of one forward+backward over one long sequence, with and without per-block checkpointing
     (an 8-layer model: checkpointing keeps one block's activations plus every block's input).
GPU (`--gpu`): tokens/s, MFU and peak memory of a ~1B Llama (Llama-3.2-1B shape, 32K vocab) trained at
  16K tokens per sequence in bf16 through `Trainer`, with our Triton attention vs the SDPA backend.
  MFU = tokens/s * (6 * matmul params + 6 * layers * heads * head_dim * seq_len) / peak (causal attention
  counts half of PaLM's 12 * L * H * D * S); the peak defaults to 989 TFLOP/s (H100/H200 dense bf16).

    python benchmarks/train.py                     # CPU, about 3-5 minutes on 2 cores
    python benchmarks/train.py --gpu               # GPU, about 2 minutes on an H200 (plus Triton compiles)
    python benchmarks/train.py --gpu --dry-run     # the GPU code path with a tiny model on CPU

Results: a markdown table on stdout, and train.md / train.json in --out (default $OUT or ./out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CPU_MODEL = dict(
    model_type="llama",
    vocab_size=259,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
# deeper and narrower for the memory test: checkpointing keeps one block's activations of L, so depth shows it
MEMORY_MODEL = dict(
    CPU_MODEL, hidden_size=128, intermediate_size=352, num_hidden_layers=8, num_attention_heads=4
)
GPU_MODEL = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
WORDS = (
    "the of and to in is was that for on with as by at from his her which or an be this are had not but "
    "they have one all were when there can more time river mountain library harbour signal"
).split()


def write_corpus(path: Path, num_docs: int, median_words: float, sigma: float, seed: int = 0) -> Path:
    """JSONL documents with log-normal lengths: most short, a long tail (what web/book mixes look like)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_docs):
            n = max(1, int(rng.lognormvariate(0, sigma) * median_words))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    return path


def train_config(model: dict, data: Path, seq_len: int, batch: int, packing: bool, out: Path, **training):
    from longreach.train.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "model": {"config": model},
            "data": {"paths": [str(data)], "seq_len": seq_len, "packing": packing, "tokenizer": "byte"},
            "optimizer": {"lr": 1e-3},
            "schedule": {"max_steps": 10_000, "warmup_steps": 0, "decay": "constant"},
            "training": {"batch_size": batch, "micro_batch_size": batch, "progress": False, **training},
            "checkpoint": {"output_dir": str(out)},
        }
    )


# ---------------------------------------------------------------- CPU: packed vs padded


def packed_vs_padded(args, work: Path) -> dict:
    from longreach.train.trainer import Trainer

    corpus = write_corpus(work / "skewed.jsonl", 4000, median_words=args.median_words, sigma=1.2)
    trainers = {
        mode: Trainer(
            train_config(
                CPU_MODEL, corpus, args.seq_len, args.batch, mode == "packed", work / mode, dtype=args.dtype
            )
        )
        for mode in ("packed", "padded")
    }
    times = {mode: [] for mode in trainers}
    real = {mode: 0 for mode in trainers}
    computed = {mode: 0 for mode in trainers}
    for step in range(args.steps + 1):
        for mode, trainer in trainers.items():
            before = trainer.tokens_seen
            record = trainer.train_step()
            if step:  # the first step warms up allocators and kernels
                times[mode].append(record["step_time_s"])
                real[mode] += trainer.tokens_seen - before
                computed[mode] += record["computed_tokens"]
    rows = {
        mode: {
            "real_tokens_per_s": real[mode] / sum(times[mode]),
            "padding_share": 1 - real[mode] / computed[mode],
            "median_step_s": statistics.median(times[mode]),
        }
        for mode in trainers
    }
    rows["speedup"] = rows["packed"]["real_tokens_per_s"] / rows["padded"]["real_tokens_per_s"]
    return rows


# ---------------------------------------------------------------- CPU: activation checkpointing memory


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(seq_len: int, checkpointing: bool) -> dict:
    """One forward+backward over one `seq_len`-token sequence; peak RSS growth over the built model."""
    import torch
    import torch.nn.functional as F

    from longreach.attention import AttentionMetadata
    from longreach.config import ModelConfig
    from longreach.model.loader import build_model
    from longreach.train.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf_dict(MEMORY_MODEL))
    if checkpointing:
        apply_activation_checkpointing(model)
    ids = torch.randint(0, 256, (seq_len,))
    meta, positions = AttentionMetadata.from_seqlens([seq_len]), torch.arange(seq_len)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    base = _rss_kib()
    start = time.perf_counter()
    loss = F.cross_entropy(model(ids, positions, meta=meta)[:-1].float(), ids[1:])
    loss.backward()
    return {
        "seq_len": seq_len,
        "checkpointing": checkpointing,
        "peak_extra_mib": (_peak_rss_kib() - base) / 1024,
        "fwd_bwd_s": time.perf_counter() - start,
    }


def checkpointing_memory(args) -> dict:
    # glibc raises its mmap threshold as large blocks are freed, then keeps freed activations in the heap, so
    # RSS would count memory already released; a fixed threshold makes every tensor an mmap unmapped on free
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for flag in (False, True):
        cmd = [sys.executable, __file__, "--_memory-child", str(args.memory_seq_len)] + (
            ["--_ac"] if flag else []
        )
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results["with" if flag else "without"] = json.loads(out.stdout.strip().splitlines()[-1])
    results["saving"] = 1 - results["with"]["peak_extra_mib"] / results["without"]["peak_extra_mib"]
    return results


# ---------------------------------------------------------------- GPU: ~1B model, Triton vs SDPA


@contextlib.contextmanager
def forced_backend(name: str):
    """Pin the model's attention (backend=None) to one backend via LONGREACH_ATTENTION_BACKEND."""
    previous = os.environ.get("LONGREACH_ATTENTION_BACKEND")
    os.environ["LONGREACH_ATTENTION_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LONGREACH_ATTENTION_BACKEND")
        else:
            os.environ["LONGREACH_ATTENTION_BACKEND"] = previous


def matmul_flops_per_token(model: dict, seq_len: int) -> float:
    h, layers, heads = model["hidden_size"], model["num_hidden_layers"], model["num_attention_heads"]
    head_dim = model.get("head_dim") or h // heads
    kv = model["num_key_value_heads"] * head_dim
    per_layer = h * heads * head_dim * 2 + 2 * h * kv + 3 * h * model["intermediate_size"]
    matmul_params = layers * per_layer + h * model["vocab_size"]  # + the LM head
    return 6 * matmul_params + 6 * layers * heads * head_dim * seq_len


def gpu_benchmark(args, work: Path) -> dict:
    import torch

    from longreach.train.trainer import Trainer

    model, device = GPU_MODEL, "cuda"
    if args.dry_run:
        model = {
            **CPU_MODEL,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for seq_len in args.gpu_seq_lens:
        corpus = write_corpus(
            work / f"long-{seq_len}.jsonl", args.gpu_steps + 4, median_words=seq_len, sigma=0.1
        )
        for backend in args.gpu_backends:
            key = f"{backend}@{seq_len}"
            try:
                with forced_backend(backend):
                    trainer = Trainer(
                        train_config(
                            model,
                            corpus,
                            seq_len,
                            1,
                            True,
                            work / key,
                            dtype="bf16",
                            device=device,
                            activation_checkpointing=args.gpu_activation_checkpointing,
                        )
                    )
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    times = [trainer.train_step()["step_time_s"] for _ in range(args.gpu_steps + 2)][2:]
                tokens_per_s = seq_len / statistics.median(times)
                results[key] = {
                    "tokens_per_s": tokens_per_s,
                    "mfu": tokens_per_s * matmul_flops_per_token(model, seq_len) / (args.peak_tflops * 1e12),
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                }
            except (
                Exception
            ) as exc:  # report and go on: one backend failing must not lose the other's figures
                results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                trainer = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            print(key, results[key], flush=True)
    return results


# ---------------------------------------------------------------- report


def report(results: dict, args) -> str:
    lines = []
    if "packing" in results:
        p = results["packing"]
        lines += [
            f"packed vs padded: seq_len {args.seq_len}, {args.batch} sequences/step, {args.steps} timed steps, "
            f"{args.dtype}, {args.threads} thread(s)",
            "",
            "| mode | real tokens/s | padding share | median step (s) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {p[m]['real_tokens_per_s']:,.0f} | {p[m]['padding_share']:.0%} | {p[m]['median_step_s']:.2f} |"
            for m in ("packed", "padded")
        ]
        lines += ["", f"packed / padded: **{p['speedup']:.2f}x**", ""]
    if "checkpointing" in results:
        c = results["checkpointing"]
        m = MEMORY_MODEL
        lines += [
            f"activation checkpointing, one {args.memory_seq_len}-token sequence, forward+backward, "
            f"{m['num_hidden_layers']} layers x hidden {m['hidden_size']}:",
            "",
            "| checkpointing | peak extra memory (MiB) | time (s) |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {c[k]['peak_extra_mib']:,.0f} | {c[k]['fwd_bwd_s']:.1f} |" for k in ("without", "with")
        ]
        lines += ["", f"memory saved: **{c['saving']:.0%}**", ""]
    if "gpu" in results:
        lines += ["| backend@seq_len | tokens/s | MFU | peak memory (GiB) |", "|---|---|---|---|"]
        for key, r in results["gpu"].items():
            if "error" in r:
                lines.append(f"| {key} | n/a: {r['error']} | | |")
            else:
                mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
                lines.append(f"| {key} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./out", help="results folder")
    p.add_argument("--seq-len", type=int, default=1024, help="packed/padded sequence length")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--median-words", type=float, default=40, help="median document length in words")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)"
    )
    p.add_argument("--memory-seq-len", type=int, default=16384)
    p.add_argument("--skip", nargs="*", default=[], choices=["packing", "checkpointing"])
    p.add_argument("--gpu", action="store_true", help="run the GPU section instead of the CPU one")
    p.add_argument("--gpu-seq-lens", type=int, nargs="+", default=[16384])
    p.add_argument("--gpu-steps", type=int, default=8)
    p.add_argument("--gpu-backends", nargs="+", default=["triton", "sdpa"])
    p.add_argument("--gpu-activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU")
    p.add_argument(
        "--dry-run", action="store_true", help="with --gpu: a tiny model, on CPU when there is no GPU"
    )
    p.add_argument("--_memory-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_ac", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args._memory_child:
        print(json.dumps(memory_child(args._memory_child, args._ac)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.gpu:
            if not torch.cuda.is_available() and not args.dry_run:
                print(
                    "benchmarks/train.py --gpu: CUDA is not available here; run it on a GPU machine "
                    "(or add --dry-run to exercise the code path on CPU)",
                    file=sys.stderr,
                )
                return 1
            if args.dry_run:
                args.gpu_seq_lens, args.gpu_steps = [128], 2
                if not torch.cuda.is_available():
                    args.gpu_backends = [b for b in args.gpu_backends if b != "triton"] + ["tiled"]
            results["gpu"] = gpu_benchmark(args, work)
        else:
            if "packing" not in args.skip:
                results["packing"] = packed_vs_padded(args, work)
            if "checkpointing" not in args.skip:
                results["checkpointing"] = checkpointing_memory(args)
    text = report(results, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "train_gpu" if args.gpu else "train"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
