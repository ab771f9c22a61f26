"""Training at lengths one device cannot hold: the chunked loss and context parallelism, measured.

1. `loss`: peak memory and time of the LM-head cross-entropy (forward + backward, one fresh process per
   setting) with the full (tokens, vocab) logits against `train/loss.py`'s chunked loss, at a 128K
   vocabulary (Llama 3's 128,256). CPU: peak RSS growth (VmHWM after clearing it, glibc's mmap threshold
   pinned so freed tensors leave RSS); CUDA: torch.cuda.max_memory_allocated growth. Settings whose full
   logits alone would pass --max-gib are not run (reported as skipped, with the estimate).
2. `cp`: one training step after a warm-up step through `longreach train` under torchrun, CP = 1, 2, 4
   ranks (gloo on CPU, NCCL on CUDA), sequences doubling in length until a rank passes the memory budget:
   on CPU each rank watches its own RSS and exits when it passes --budget-mib; on CUDA the budget is
   torch.cuda.set_per_process_memory_fraction and an out-of-memory error ends the run. Reports the longest
   sequence that trained, peak memory per rank and tokens/s per rank, for the chunked and the full loss.

    python benchmarks/train_long.py loss                 # CPU defaults: hidden 576, bf16, 1K-4K tokens
    python benchmarks/train_long.py cp                   # CPU defaults: CP 1/2/4, 1,000 MiB per rank, from 1K
    python benchmarks/train_long.py loss --device cuda --tokens 8192 16384 32768 65536 --max-gib 100
    python benchmarks/train_long.py cp --device cuda --cp 1 2 4 --budget-mib 20000 --lengths 16384

Results: markdown on stdout and train_long_<part>.md / .json in --out (default $OUT or ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from train import write_corpus  # benchmarks/train.py: the length-skewed JSONL corpus

CP_MODEL = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=2048,  # wide MLP: activation memory per token without much attention compute
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1 << 20,
    tie_word_embeddings=True,
)
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed large tensors leave RSS at once (see train.py)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


# ---------------------------------------------------------------- 1. the loss alone


def loss_child(tokens: int, vocab: int, hidden: int, dtype: str, chunk: int, device: str) -> dict:
    """Forward + backward of one loss over (tokens, hidden) states; peak memory growth and time."""
    import torch
    import torch.nn.functional as F

    from longreach.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    h = torch.randn(tokens, hidden, device=device).to(dt).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.02).to(dt).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
        base = _proc_status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if chunk:
        loss = chunked_cross_entropy(h, w, labels, chunk)
    else:
        loss = F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum")
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status_kib("VmHWM") * 1024
    return {"peak_extra_mib": (peak - base) / 2**20, "time_s": time.perf_counter() - start}


def loss_sweep(args) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **MMAP_ENV}
    rows = []
    for tokens in args.tokens:
        for chunk in (0, args.chunk):
            row = {"tokens": tokens, "loss": f"chunked ({chunk})" if chunk else "full"}
            # full: the logits in the compute dtype, their fp32 copy and its gradient, at least
            held = tokens if not chunk else min(chunk, tokens)
            estimate_gib = held * args.vocab * (4 + 4 + (2 if args.dtype == "bf16" else 4)) / 2**30
            if estimate_gib > args.max_gib:
                row["skipped"] = f"needs >= {estimate_gib:.1f} GiB of logits (budget {args.max_gib:g})"
            else:
                cmd = [sys.executable, __file__, "_loss_child", json.dumps([tokens, args.vocab, args.hidden])]
                cmd += [json.dumps([args.dtype, chunk, args.device])]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode:
                    row["skipped"] = f"failed: {out.stderr.strip().splitlines()[-1][:200]}"
                else:
                    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            print(row, flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- 2. context parallelism


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def write_train_config(path: Path, corpus: Path, seq_len: int, chunk: int, device: str, out: Path) -> None:
    tables = {
        "model": {"config": CP_MODEL},
        "data": {"paths": [str(corpus)], "seq_len": seq_len, "tokenizer": "byte", "shuffle": False},
        "optimizer": {"lr": 1e-4},
        "schedule": {"max_steps": 2, "warmup_steps": 0, "decay": "constant"},
        "training": {
            "batch_size": 1,
            "micro_batch_size": 1,
            "dtype": "fp32" if device == "cpu" else "bf16",
            "device": device if device == "cpu" else None,
            "loss_chunk_size": chunk,
            "progress": False,
        },
        "checkpoint": {"output_dir": str(out), "save_every": 1000},
    }
    text = ""
    for name, table in tables.items():
        items = {k: v for k, v in table.items() if v is not None}
        text += f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in items.items()) + "\n"
    path.write_text(text)


def _watch_rss(budget_mib: float, report: Path, rank: int) -> None:
    """Exit this rank the moment its RSS passes the budget (the run then counts as not fitting)."""
    while True:
        rss = _proc_status_kib("VmRSS") / 1024
        if rss > budget_mib:
            report.write_text(json.dumps({"rank": rank, "exceeded": True, "rss_mib": rss}))
            os._exit(17)
        time.sleep(0.02)


def rank_main(config: str, context: int, budget_mib: float, result_dir: str, device: str) -> int:
    """One torchrun rank: train 2 steps with `--context-parallel context` inside the memory budget."""
    import torch

    rank = int(os.environ.get("RANK", 0))
    report = Path(result_dir) / f"rank{rank}.json"
    torch.set_num_threads(1)
    if device == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_mib * 2**20 / total), local)
    else:
        threading.Thread(target=_watch_rss, args=(budget_mib, report, rank), daemon=True).start()
    from longreach.cli import main

    try:
        code = main(["train", "--config", config, "--context-parallel", str(context), "--no-progress"])
    except torch.OutOfMemoryError as exc:
        report.write_text(json.dumps({"rank": rank, "exceeded": True, "error": str(exc)[:200]}))
        return 17
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _proc_status_kib("VmHWM") / 1024
    report.write_text(json.dumps({"rank": rank, "exceeded": False, "peak_mib": peak}))
    return code


def run_cp(args, work: Path, corpus: Path, context: int, seq_len: int, chunk: int) -> dict:
    """One torchrun job; returns the row (fits, peak per rank, tokens/s per rank) or why it did not fit."""
    run = work / f"cp{context}-{seq_len}-{chunk}"
    run.mkdir()
    write_train_config(run / "c.toml", corpus, seq_len, chunk, args.device, run / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **MMAP_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(context)]
    cmd += [
        __file__,
        "_rank",
        json.dumps([str(run / "c.toml"), context, args.budget_mib, str(run), args.device]),
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    ranks = [json.loads(p.read_text()) for p in sorted(run.glob("rank*.json"))]
    row = {"cp": context, "seq_len": seq_len, "loss": "chunked" if chunk else "full"}
    row["wall_s"] = time.perf_counter() - start
    if any(r["exceeded"] for r in ranks):
        return {**row, "fits": False}
    if out.returncode or len(ranks) != context:
        return {**row, "fits": False, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    steps = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
    step_s = steps[-1]["step_time_s"]  # the second step: the first warms allocators and kernels up
    peak = max(r["peak_mib"] for r in ranks)
    return {
        **row,
        "fits": True,
        "peak_mib_per_rank": peak,
        "step_s": step_s,
        "tokens_per_s_per_rank": seq_len / context / step_s,
    }


def cp_sweep(args, work: Path) -> list[dict]:
    longest = max(args.lengths) * 2**args.max_doublings
    corpus = write_corpus(
        work / "corpus.jsonl", 3 * longest // 800 + 8, median_words=args.median_words, sigma=1.0
    )
    rows = []
    for chunk in (args.cp_chunk, 0):
        for context in args.cp if chunk else args.full_cp:
            for seq_len in (n * 2**d for n in args.lengths for d in range(args.max_doublings + 1)):
                row = run_cp(args, work, corpus, context, seq_len, chunk)
                print(row, flush=True)
                rows.append(row)
                if not row["fits"]:
                    break
    return rows


# ---------------------------------------------------------------- report


def report_loss(rows, args) -> str:
    lines = [
        f"LM-head loss, forward + backward: vocabulary {args.vocab:,}, hidden {args.hidden}, {args.dtype}, "
        f"{args.device}",
        "",
        "| tokens | loss | peak extra memory (MiB) | time (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['tokens']:,} | {r['loss']} | not run: {r['skipped']} | |")
        else:
            lines.append(
                f"| {r['tokens']:,} | {r['loss']} | {r['peak_extra_mib']:,.0f} | {r['time_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def report_cp(rows, args) -> str:
    m = CP_MODEL
    lines = [
        f"context parallelism, one training step (after a warm-up step), model hidden {m['hidden_size']} x "
        f"{m['num_hidden_layers']} layers, vocabulary {m['vocab_size']:,}, budget {args.budget_mib:,.0f} MiB "
        f"per rank, {args.device}",
        "",
        "| loss | CP | sequence | fits | peak memory per rank (MiB) | tokens/s per rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["fits"]:
            figures = f"yes | {r['peak_mib_per_rank']:,.0f} | {r['tokens_per_s_per_rank']:,.0f}"
        else:
            figures = f"no{': ' + r['error'] if 'error' in r else ''} | > budget | -"
        lines.append(f"| {r['loss']} | {r['cp']} | {r['seq_len']:,} | {figures} |")
    lines += ["", "| loss | CP | longest sequence within the budget |", "|---|---|---|"]
    for loss in dict.fromkeys(r["loss"] for r in rows):
        for context in dict.fromkeys(r["cp"] for r in rows if r["loss"] == loss):
            fitting = [r["seq_len"] for r in rows if r["loss"] == loss and r["cp"] == context and r["fits"]]
            lines.append(
                f"| {loss} | {context} | {max(fitting):,} |" if fitting else f"| {loss} | {context} | none |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_loss_child":
        print(json.dumps(loss_child(*json.loads(argv[1]), *json.loads(argv[2]))))
        return 0
    if argv and argv[0] == "_rank":
        return rank_main(*json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["loss", "cp"])
    p.add_argument("--out", default=os.environ.get("OUT") or "./out", help="results folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the chunked loss")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the loss processes")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096], help="loss: token counts")
    p.add_argument("--vocab", type=int, default=128256, help="loss: vocabulary (Llama 3's)")
    p.add_argument("--hidden", type=int, default=576, help="loss: hidden size")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="loss: hidden/weight dtype")
    p.add_argument("--max-gib", type=float, default=4.0, help="loss: skip settings whose logits need more")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="cp: context-parallel sizes")
    p.add_argument("--cp-chunk", type=int, default=256, help="cp: tokens per chunk of the chunked loss")
    p.add_argument(
        "--full-cp", type=int, nargs="*", default=[1, 2], help="cp: sizes also run with the full loss"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[1024], help="cp: first sequence length(s)")
    p.add_argument("--max-doublings", type=int, default=5, help="cp: doublings of each length at most")
    p.add_argument("--budget-mib", type=float, default=1000, help="cp: memory budget per rank (MiB)")
    p.add_argument("--median-words", type=float, default=150, help="cp: median document length in words")
    p.add_argument("--timeout", type=float, default=600, help="cp: seconds per torchrun job")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part == "loss":
            rows = loss_sweep(args)
            text = report_loss(rows, args)
        else:
            rows = cp_sweep(args, Path(tmp))
            text = report_cp(rows, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_long_{args.part}.md").write_text(text)
    (out / f"train_long_{args.part}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
