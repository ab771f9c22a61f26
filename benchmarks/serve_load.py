"""Load on the HTTP server: a burst of concurrent streaming clients, some of which leave mid-stream.

Starts `longreach serve` (the real command, bundled model, fp32 on CPU) twice in one run: with a KV cache
that holds the whole burst ("roomy") and with one too small for it ("tight": requests queue and are
preempted). Each time it sends all requests at once through the official `openai` async client (a cold
server: nothing in the prefix cache), then every request alone (the reference texts), and reports requests/s, output tokens/s, TTFT p50/p99 (from
the client: request sent -> first streamed text), preemptions and aborts from /metrics, whether every
request that stayed got the same text as alone, and the KV blocks still held afterwards (must be 0).

    .venv/bin/python benchmarks/serve_load.py                   # 64 clients, 6 leave; ~4 min on 2 cores
    .venv/bin/python benchmarks/serve_load.py --clients 16 --leavers 2 --out /tmp/load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by a test
from serve_process import ServeProcess  # noqa: E402

from longreach.model.bundled import BUNDLED_MODEL_DIR  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def make_requests(num: int, min_len: int, max_len: int, max_tokens: int, seed: int) -> list[dict]:
    """Pass-key prompts of mixed byte lengths (the bundled model's tokens are bytes); half greedy, half
    seeded sampling, so both must reproduce under load."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        key = rng.randrange(10000, 99999)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        question = "What is the pass key? The pass key is"
        room = max(0, rng.randint(min_len, max_len) - len(needle) - len(question))
        hay = (FILLER * (room // len(FILLER) + 1))[:room]
        cut = rng.randint(0, len(hay))
        sampled = i % 2 == 1
        out.append(
            {
                "prompt": hay[:cut] + needle + hay[cut:] + question,
                "max_tokens": max_tokens,
                "temperature": 0.8 if sampled else 0.0,
                "seed": 1000 + i if sampled else None,
            }
        )
    return out


async def one(client, req: dict, leave_after: int | None) -> dict:
    """Stream one completion; `leave_after` chunks then close the connection (a client that goes away)."""
    start = time.perf_counter()
    ttft, text, chunks = None, [], 0
    stream = await client.completions.create(
        model="demo",
        stream=True,
        **{k: v for k, v in req.items() if v is not None},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        piece = chunk.choices[0].text if chunk.choices else ""
        if piece and ttft is None:
            ttft = time.perf_counter() - start
        text.append(piece)
        chunks += 1
        if leave_after is not None and chunks >= leave_after:
            await stream.close()
            return {"left": True}
    return {"left": False, "text": "".join(text), "ttft": ttft, "done": time.perf_counter() - start}


async def burst(url: str, reqs: list[dict], leavers: set[int]) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    results = await asyncio.gather(*(one(client, r, 2 if i in leavers else None) for i, r in enumerate(reqs)))
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


def alone(url: str, reqs: list[dict]) -> list[str]:
    texts = []
    with httpx.Client(timeout=300) as http:
        for r in reqs:
            body = {"model": "demo", "ignore_eos": True, **{k: v for k, v in r.items() if v is not None}}
            response = http.post(url + "/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"a request alone got {response.status_code}: {response.text}")
            texts.append(response.json()["choices"][0]["text"])
    return texts


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the samples at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_setting(name: str, extra: list[str], reqs: list[dict], leavers: set[int], threads: int) -> dict:
    demo = str(BUNDLED_MODEL_DIR)  # explicit: `longreach serve` alone now serves SmolLM2 when installed
    server = ServeProcess([demo, "--served-model-name", "demo", *extra], threads)
    try:
        results, wall = asyncio.run(burst(server.url, reqs, leavers))  # cold: no prefix cached yet
        server.wait_idle(60)
        counters = {k: server.metric(k) for k in ("num_preemptions_total", "generation_tokens_total")}
        aborted = server.metric("request_success_total", '{finished_reason="abort"}')
        kv_after = server.metric("kv_cache_blocks_used")
        reference = alone(server.url, reqs)  # afterwards, one at a time
        stayed = [(i, r) for i, r in enumerate(results) if not r["left"]]
        same = sum(r["text"] == reference[i] for i, r in stayed)
        ttfts = [r["ttft"] for _, r in stayed]
        row = {
            "setting": name,
            "flags": " ".join(extra),
            "clients": len(reqs),
            "left": len(leavers),
            "completed": len(stayed),
            "same_as_alone": same,
            "wall_s": wall,
            "requests_per_s": len(stayed) / wall,
            "output_tokens_per_s": counters["generation_tokens_total"] / wall,
            "ttft_p50_s": pct(ttfts, 50),
            "ttft_p99_s": pct(ttfts, 99),
            "ttft_mean_s": statistics.fmean(ttfts),
            "preemptions": counters["num_preemptions_total"],
            "aborted": aborted,
            "kv_blocks_used_after": kv_after,
            "kv_blocks_total": server.metric("kv_cache_blocks_total"),
        }
    finally:
        row_exit = server.stop()
    row["exit_status"] = row_exit
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--leavers", type=int, default=6, help="clients that disconnect after their second chunk")
    p.add_argument("--min-len", type=int, default=100, help="shortest prompt, in the model's tokens (bytes)")
    p.add_argument("--max-len", type=int, default=1000, help="longest prompt")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--tight-blocks", type=int, default=96, help="KV blocks of 16 tokens in the tight setting")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for load.json and load.md")
    args = p.parse_args(argv)
    if not 0 <= args.leavers < args.clients:
        p.error(f"--leavers {args.leavers} must be in [0, --clients {args.clients})")
    if args.tight_blocks * 16 < args.max_len + args.max_tokens:
        p.error(
            f"--tight-blocks {args.tight_blocks} x 16 tokens cannot hold one request of --max-len "
            f"{args.max_len} + --max-tokens {args.max_tokens}"
        )
    reqs = make_requests(args.clients, args.min_len, args.max_len, args.max_tokens, args.seed)
    leavers = set(random.Random(args.seed + 1).sample(range(args.clients), args.leavers))
    total_tokens = sum(len(r["prompt"]) + r["max_tokens"] for r in reqs)
    roomy_blocks = (total_tokens // 16) + 2 * args.clients
    common = ["--max-model-len", "2048", "--max-num-seqs", str(args.clients)]
    settings = [
        ("roomy", common + ["--num-kv-blocks", str(roomy_blocks)]),
        ("tight", common + ["--num-kv-blocks", str(args.tight_blocks)]),
    ]
    rows = []
    for name, extra in settings:
        print(f"[{name}] {' '.join(extra)}", file=sys.stderr, flush=True)
        rows.append(run_setting(name, extra, reqs, leavers, args.threads))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        "| KV cache | clients (left) | completed, same text as alone | requests/s | output tok/s | "
        "TTFT p50 (s) | TTFT p99 (s) | preemptions | aborted | KV blocks held after |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} ({int(r['kv_blocks_total'])} blocks of 16) | {r['clients']} ({r['left']}) | "
            f"{r['completed']}, {r['same_as_alone']} | {r['requests_per_s']:.1f} | "
            f"{r['output_tokens_per_s']:.0f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
            f"{int(r['preemptions'])} | {int(r['aborted'])} | {int(r['kv_blocks_used_after'])} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load.json").write_text(json.dumps(rows, indent=2))
        (args.out / "load.md").write_text(table + "\n")
    ok = all(
        r["same_as_alone"] == r["completed"] and r["kv_blocks_used_after"] == 0 and r["exit_status"] == 0
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
