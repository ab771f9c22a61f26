"""Serving benchmark: longreach's engine against Hugging Face transformers on one random checkpoint.

    python benchmarks/serving.py                      # the CPU benchmark of docs/benchmarks.md
    python benchmarks/serving.py --preset 1b --device cuda --min-prompt 8192 --max-prompt 32768 ...

Four cases, each system and case in a fresh subprocess (so peak memory is its own):

1. throughput: N requests (prompt lengths uniform in [min, max], fixed output length, greedy, EOS
   ignored so every request makes the same number of tokens), all submitted at t0. Systems: ours;
   transformers `generate` one request at a time; `generate` on left-padded batches; transformers'
   continuous batching `generate_batch`. Output tokens/s = all output tokens / wall time; TTFT = time
   from t0 to a request's first token, averaged (queueing included, as for any offline batch).
2. shared prefix: one request with a long prefix runs first; then the others, sharing the prefix (each
   with its own 32-token suffix), arrive all together, and then again one after another. With prefix
   caching their TTFT should be a small fraction of the first's.
3. prefill only: the throughput case's prompts with one output token, ours vs transformers: the matmuls
   both must do, so transformers' one-at-a-time wall time over our prefill time bounds the throughput ratio.
4. long prompt: one very long prompt prefilled in chunks vs in one piece: peak memory of each.

Peak memory is the process's peak RSS (CPU) or peak allocated CUDA memory, reported in full and above
the level right after the weights were loaded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # about 34M parameters: the model of the issue's CPU measurements
    "34m": dict(
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
}


def make_checkpoint(path: Path, preset: str, max_positions: int) -> Path:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        **PRESETS[preset],
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# ---------------------------------------------------------------- measurement helpers (run in the child)


def _memory_now(device) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(queue, fn_name, kwargs):
    import torch

    torch.set_num_threads(kwargs.pop("threads"))
    try:
        queue.put(globals()[fn_name](**kwargs))
    except Exception as exc:  # report and keep the benchmark going
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(fn_name: str, timeout_s: float | None = None, **kwargs) -> dict:
    """fn_name(**kwargs) in a fresh process; a run past timeout_s is stopped and reported as such."""
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn_name, kwargs))
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except queue_mod.Empty:
        proc.terminate()
        result = {"error": f"did not finish within {timeout_s:.0f} s", "timed_out_s": timeout_s}
    proc.join()
    return result


def _summary(num_tokens, seconds, ttfts, mem_peak, mem_loaded, **extra) -> dict:
    return dict(
        output_tokens=num_tokens,
        seconds=seconds,
        tokens_per_s=num_tokens / seconds,
        mean_ttft_s=sum(ttfts) / len(ttfts),
        peak_mib=mem_peak / 2**20,
        over_weights_mib=(mem_peak - mem_loaded) / 2**20,
        **extra,
    )


# ---------------------------------------------------------------- the systems


def ours(path, prompts, output_len, device, max_num_batched_tokens, dtype="fp32", **_):
    from longreach import LLM, SamplingParams
    from longreach.model.loader import load_model

    model = load_model(path, dtype=dtype, device=device)
    loaded = _memory_now(device)
    max_len = max(map(len, prompts)) + output_len
    needed = sum(len(p) + output_len for p in prompts) + 16 * len(prompts)  # every request resident at once
    llm = LLM(
        model,
        device=device,
        max_model_len=max_len,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory=_kv_bytes(model, needed, dtype),
    )
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    ttfts = [o.metrics.first_token_time - start for o in outs]
    return _summary(
        sum(len(o.token_ids) for o in outs),
        seconds,
        ttfts,
        _memory_now(device),
        loaded,
        token_ids=[o.token_ids for o in outs],
    )


def prefill_only(path, prompts, device, max_num_batched_tokens, system, dtype="fp32", **_):
    """Every prompt's prefill and first token, nothing else: `system` "ours" (one LLM.generate with
    max_tokens=1) or "hf" (`generate(max_new_tokens=1)` one prompt at a time). The same matmuls in both, so
    this bounds what batching decode can win."""
    import torch

    if system == "ours":
        res = ours(path, prompts, 1, device, max_num_batched_tokens, dtype)
        return {"seconds": res["seconds"], "prompt_tokens": sum(map(len, prompts))}
    model = _hf_model(path, device, dtype)
    start = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0
            )
    return {"seconds": time.perf_counter() - start, "prompt_tokens": sum(map(len, prompts))}


def _kv_bytes(model, num_tokens, dtype):
    cfg = model.config
    elem = 2 if dtype in ("bf16", "fp16") else 4
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem * num_tokens


def _hf_model(path, device, dtype):
    import torch
    import transformers

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as ours does
    return model


class _FirstTokenClock:
    """A transformers streamer that records when the first generated tokens appear (the first put is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def hf_single(path, prompts, output_len, device, dtype="fp32", **_):
    import torch

    model = _hf_model(path, device, dtype)
    loaded = _memory_now(device)
    outs, ttfts = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            clock = _FirstTokenClock()
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
            ttfts.append(clock.first - start)
            outs.append(gen[0, len(p) :].tolist())
    seconds = time.perf_counter() - start
    return _summary(sum(map(len, outs)), seconds, ttfts, _memory_now(device), loaded, token_ids=outs)


def hf_padded(path, prompts, output_len, device, batch_size, dtype="fp32", **_):
    import torch

    model = _hf_model(path, device, dtype)
    loaded = _memory_now(device)
    num_tokens, ttfts = 0, []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            clock = _FirstTokenClock()
            gen = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
            ttfts += [clock.first - start] * len(chunk)
            num_tokens += (gen.shape[1] - width) * len(chunk)
    seconds = time.perf_counter() - start
    return _summary(num_tokens, seconds, ttfts, _memory_now(device), loaded, batch_size=batch_size)


def hf_generate_batch(path, prompts, output_len, device, max_num_batched_tokens, dtype="fp32", **_):
    import transformers

    model = _hf_model(path, device, dtype)
    loaded = _memory_now(device)
    gen_cfg = transformers.GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    page = 256
    num_tokens = sum(len(p) + output_len for p in prompts)
    cb_cfg = transformers.ContinuousBatchingConfig(
        page_size=page,
        num_blocks=num_tokens // page + 2 * len(prompts),
        max_batch_tokens=max_num_batched_tokens,
    )
    start = time.perf_counter()
    outs = model.generate_batch(
        prompts, generation_config=gen_cfg, continuous_batching_config=cb_cfg, record_timestamps=True
    )
    seconds = time.perf_counter() - start
    ordered = [outs[k] for k in sorted(outs, key=lambda k: int(k.split("_")[-1]))]
    ttfts = [o.timestamps[0] - start for o in ordered]
    return _summary(
        sum(len(o.generated_tokens) for o in ordered),
        seconds,
        ttfts,
        _memory_now(device),
        loaded,
        token_ids=[o.generated_tokens for o in ordered],
    )


def shared_prefix(
    path,
    prefix_len,
    suffix_len,
    num_requests,
    output_len,
    device,
    enable_prefix_caching,
    max_num_batched_tokens,
    dtype="fp32",
    seed=0,
    **_,
):
    """The first request alone; then the others either all at once or one after another (fresh suffixes)."""
    import random

    from longreach import LLM, SamplingParams

    rng = random.Random(seed)
    prefix = [rng.randrange(3, 32000) for _ in range(prefix_len)]
    make = lambda: prefix + [rng.randrange(3, 32000) for _ in range(suffix_len)]  # noqa: E731
    llm = LLM(
        path,
        dtype=dtype,
        device=device,
        max_model_len=prefix_len + suffix_len + output_len,
        enable_prefix_caching=enable_prefix_caching,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=num_requests,
    )
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    first = llm.generate([make()], params, use_tqdm=False)[0].metrics.ttft
    together = [
        o.metrics.ttft
        for o in llm.generate([make() for _ in range(num_requests - 1)], params, use_tqdm=False)
    ]
    one_by_one = [
        llm.generate([make()], params, use_tqdm=False)[0].metrics.ttft for _ in range(num_requests - 1)
    ]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return dict(
        first_ttft_s=first,
        together_mean_ttft_s=mean(together),
        together_ratio=mean(together) / first,
        one_by_one_mean_ttft_s=mean(one_by_one),
        one_by_one_ratio=mean(one_by_one) / first,
    )


def long_prompt(path, length, output_len, device, chunk, dtype="fp32", seed=0, **_):
    import random

    from longreach import LLM, SamplingParams
    from longreach.model.loader import load_model

    rng = random.Random(seed)
    prompt = [rng.randrange(3, 32000) for _ in range(length)]
    model = load_model(path, dtype=dtype, device=device)
    loaded = _memory_now(device)
    max_len = length + output_len
    chunked = chunk is not None
    llm = LLM(
        model,
        device=device,
        max_model_len=max_len,
        max_num_seqs=1,
        max_num_batched_tokens=chunk if chunked else max_len,
        enable_chunked_prefill=chunked,
        kv_cache_memory=_kv_bytes(model, max_len + 64, dtype),
    )
    start = time.perf_counter()
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    seconds = time.perf_counter() - start
    peak = _memory_now(device)
    return dict(
        seconds=seconds,
        ttft_s=out.metrics.ttft,
        peak_mib=peak / 2**20,
        over_weights_mib=(peak - loaded) / 2**20,
        token_ids=out.token_ids,
    )


# ---------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="34m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--padded-batch-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--systems", default="ours,hf_single,hf_padded,hf_generate_batch")
    ap.add_argument("--prefix-len", type=int, default=4096)
    ap.add_argument("--prefix-requests", type=int, default=16)
    ap.add_argument("--long-len", type=int, default=32768)
    ap.add_argument("--long-chunk", type=int, default=2048)
    ap.add_argument("--cases", default="throughput,prefill,prefix,long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--system-timeout",
        type=float,
        default=300.0,
        help="stop a throughput system that runs longer than this (seconds) and report it",
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import random

    cases = args.cases.split(",")
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(3, 32000) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
        for _ in range(args.num_requests)
    ]
    max_positions = (
        max(
            args.max_prompt + args.output_len,
            args.prefix_len + 64 + args.output_len,
            args.long_len + args.output_len,
        )
        + 16
    )
    common = dict(threads=args.threads, device=args.device, dtype=args.dtype)
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "model", args.preset, max_positions)
        print(
            f"# {args.preset} random Llama, {args.device}, {args.dtype}, {args.threads} threads", flush=True
        )
        if "throughput" in cases:
            print(
                f"\n## {args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
                f"{args.output_len} output tokens, greedy\n"
            )
            print(
                "| system | output tok/s | mean TTFT (s) | wall (s) | peak RSS (MiB) | above weights (MiB) |"
            )
            print("|---|---:|---:|---:|---:|---:|")
            for system in args.systems.split(","):
                res = run_isolated(
                    system,
                    timeout_s=args.system_timeout,
                    path=path,
                    prompts=prompts,
                    output_len=args.output_len,
                    batch_size=args.padded_batch_size,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    **common,
                )
                results[system] = res
                if "timed_out_s" in res:
                    bound = args.num_requests * args.output_len / res["timed_out_s"]
                    print(
                        f"| {system} | < {bound:.1f} (stopped: {res['error']}) | | > {res['timed_out_s']:.0f} | | |",
                        flush=True,
                    )
                    continue
                if "error" in res:
                    print(f"| {system} | failed: {res['error']} | | | | |", flush=True)
                    continue
                print(
                    f"| {system} | {res['tokens_per_s']:.1f} | {res['mean_ttft_s']:.2f} | {res['seconds']:.1f} "
                    f"| {res['peak_mib']:.0f} | {res['over_weights_mib']:.0f} |",
                    flush=True,
                )
            if "token_ids" in results.get("ours", {}) and "token_ids" in results.get("hf_single", {}):
                same = sum(
                    a == b for a, b in zip(results["ours"]["token_ids"], results["hf_single"]["token_ids"])
                )
                print(f"\ngreedy outputs identical to transformers one-at-a-time: {same}/{len(prompts)}")
        if "prefill" in cases:
            print(f"\n## prefill only: the same {args.num_requests} prompts, 1 output token\n")
            print("| system | wall (s) | prompt tok/s |")
            print("|---|---:|---:|")
            for system in ("ours", "hf"):
                res = run_isolated(
                    "prefill_only",
                    path=path,
                    prompts=prompts,
                    system=system,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    **common,
                )
                results[f"prefill_{system}"] = res
                if "error" in res:
                    print(f"| {system} | failed: {res['error']} | |", flush=True)
                    continue
                print(
                    f"| {system} | {res['seconds']:.1f} | {res['prompt_tokens'] / res['seconds']:.0f} |",
                    flush=True,
                )
            hf_wall = results.get("hf_single", {}).get("seconds")
            ours_prefill = results["prefill_ours"].get("seconds")
            if hf_wall and ours_prefill:
                print(
                    f"\nupper bound on ours / hf_single throughput (our decode free): "
                    f"{hf_wall / ours_prefill:.2f}x",
                    flush=True,
                )
        if "prefix" in cases:
            print(f"\n## shared {args.prefix_len}-token prefix, {args.prefix_requests} requests\n")
            print(
                "| prefix caching | first TTFT (s) | the rest arriving together: mean TTFT (s), ratio "
                "| the rest arriving one by one: mean TTFT (s), ratio |"
            )
            print("|---|---:|---:|---:|")
            for enabled in (True, False):
                res = run_isolated(
                    "shared_prefix",
                    path=path,
                    prefix_len=args.prefix_len,
                    suffix_len=32,
                    num_requests=args.prefix_requests,
                    output_len=8,
                    enable_prefix_caching=enabled,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    seed=args.seed,
                    **common,
                )
                results[f"prefix_caching_{enabled}"] = res
                if "error" in res:
                    print(f"| {enabled} | failed: {res['error']} | | |", flush=True)
                    continue
                print(
                    f"| {'on' if enabled else 'off'} | {res['first_ttft_s']:.2f} | {res['together_mean_ttft_s']:.3f}, "
                    f"{res['together_ratio']:.3f} | {res['one_by_one_mean_ttft_s']:.3f}, {res['one_by_one_ratio']:.3f} |",
                    flush=True,
                )
        if "long" in cases:
            print(f"\n## one {args.long_len}-token prompt, 4 output tokens\n")
            print("| prefill | wall (s) | peak RSS (MiB) | above weights (MiB) |")
            print("|---|---:|---:|---:|")
            for chunk in (args.long_chunk, None):
                res = run_isolated(
                    "long_prompt",
                    path=path,
                    length=args.long_len,
                    output_len=4,
                    chunk=chunk,
                    seed=args.seed,
                    **common,
                )
                results[f"long_chunk_{chunk}"] = res
                label = f"chunked ({chunk} tokens/step)" if chunk else "one piece"
                if "error" in res:
                    print(f"| {label} | failed: {res['error']} | | |", flush=True)
                    continue
                print(
                    f"| {label} | {res['seconds']:.1f} | {res['peak_mib']:.0f} | {res['over_weights_mib']:.0f} |",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
