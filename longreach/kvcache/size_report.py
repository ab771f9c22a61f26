"""`longreach kv-size`: the KV-size calculator's figures as a report (plain data, a table, JSON) and its CLI.

Every figure comes from the calculator (`kvcache.spec`, and `kvcache.spec_policies` for `--policy` rows);
this module only validates the inputs, lays the figures out and parses the command line. The model is a
preset or a checkpoint directory (`kvcache.presets`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any

from longreach.kvcache.codecs import INT4_GROUP_SIZE
from longreach.kvcache.policies import make_policy, parse_policy_spec
from longreach.kvcache.presets import PRESETS, NamedModelConfig, resolve_model
from longreach.kvcache.spec import (
    DEFAULT_GPU_PRICE_PER_HOUR,
    DEFAULT_MFU,
    DEFAULT_PEAK_TFLOPS,
    KV_DTYPE_ALIASES,
    KV_DTYPES,
    GiB,
    KiB,
    check_kv_dtype,
    kv_bytes_per_request,
    kv_bytes_per_request_without_gqa,
    kv_bytes_per_token,
    num_params,
    prefill_cost,
    prefill_flops,
)
from longreach.kvcache.spec_policies import DEFAULT_BLOCK_SIZE, tokens_under_policy

DEFAULT_CONTEXT = 128 * 1024


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and value >= 1


def _check_report_inputs(
    context_len: int, batch: int, peak_tflops: float, mfu: float, gpu_price_per_hour: float
) -> None:
    for label, value, ok, accepted in (
        ("context_len", context_len, _is_positive_int(context_len), "an integer >= 1"),
        ("batch", batch, _is_positive_int(batch), "an integer >= 1"),
        ("peak_tflops", peak_tflops, peak_tflops > 0, "> 0"),
        ("mfu", mfu, 0 < mfu <= 1, "in (0, 1]"),
        ("gpu_price_per_hour", gpu_price_per_hour, gpu_price_per_hour >= 0, ">= 0"),
    ):
        if not ok:
            raise ValueError(f"{label}={value!r} must be {accepted}")


def _arch_summary(model: NamedModelConfig) -> dict[str, Any]:
    """The shape numbers a report shows, under the names its JSON has always used."""
    config = model.config
    return {
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "name": model.name,
    }


def _kv_row(model: NamedModelConfig, context_len: int, dtype: str, batch: int) -> dict[str, Any]:
    per_token = kv_bytes_per_token(model.config, dtype)
    per_request = kv_bytes_per_request(model.config, context_len, dtype)
    return {
        "dtype": dtype,
        "data_bytes_per_token": per_token.data,
        "scale_bytes_per_token": per_token.scales,
        "data_bytes_per_request": per_request.data,
        "scale_bytes_per_request": per_request.scales,
        "total_bytes_per_request": per_request.total,
        "total_bytes_without_gqa": kv_bytes_per_request_without_gqa(model.config, context_len, dtype).total,
        "total_bytes_batch": per_request.total * batch,
    }


def report(
    model: NamedModelConfig,
    context_len: int,
    dtypes: list[str] | None = None,
    batch: int = 1,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    mfu: float = DEFAULT_MFU,
    gpu_price_per_hour: float = DEFAULT_GPU_PRICE_PER_HOUR,
) -> dict[str, Any]:
    """Everything `kv-size` prints, as plain data (bytes, FLOPs, seconds, dollars)."""
    _check_report_inputs(context_len, batch, peak_tflops, mfu, gpu_price_per_hour)
    flops = prefill_flops(model.config, context_len)
    gpu_seconds, dollars = prefill_cost(flops["total"], peak_tflops, mfu, gpu_price_per_hour)
    return {
        "arch": _arch_summary(model),
        "num_params": num_params(model.config),
        "num_params_nonembedding": num_params(model.config, include_embeddings=False),
        "context_len": context_len,
        "batch": batch,
        "kv": [_kv_row(model, context_len, dtype, batch) for dtype in dtypes or list(KV_DTYPES)],
        "prefill": {
            "flops_per_request": flops,
            "peak_tflops": peak_tflops,
            "mfu": mfu,
            "gpu_price_per_hour": gpu_price_per_hour,
            "gpu_seconds_per_request": gpu_seconds,
            "dollars_per_request": dollars,
            "gpu_seconds_batch": gpu_seconds * batch,
            "dollars_batch": dollars * batch,
        },
    }


def policy_rows(
    model: NamedModelConfig,
    context_len: int,
    dtypes: list[str],
    specs: list[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[dict[str, Any]]:
    """One row per policy spec ('none', 'window:4096', 'sinks:window=4096,num_sinks=4', 'h2o:1024', ...):
    tokens kept, tokens held in whole blocks, and bytes per request for each dtype."""
    rows = []
    for spec in specs:
        name, kwargs = parse_policy_spec(spec)
        bound = tokens_under_policy(make_policy(name, **kwargs), context_len, block_size)
        bytes_held = {
            dtype: kv_bytes_per_request(model.config, bound.tokens_held, dtype).total for dtype in dtypes
        }
        rows.append(
            {
                "policy": spec,
                "tokens_kept": bound.tokens_kept,
                "tokens_held": bound.tokens_held,
                "bytes_per_request": bytes_held,
            }
        )
    return rows


def _align(table: list[list[str]]) -> list[str]:
    """First column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
        for row in table
    ]


def _kv_table(rep: dict[str, Any]) -> list[str]:
    batch = rep["batch"]
    header = ["dtype", "KiB/token", "+scales B/token", "data GiB", "scales GiB", "total GiB", "no-GQA GiB"]
    if batch > 1:
        header.append(f"x{batch} GiB")
    table = [header]
    for row in rep["kv"]:
        cells = [
            row["dtype"],
            f"{row['data_bytes_per_token'] / KiB:,.1f}",
            f"{row['scale_bytes_per_token']:,.0f}",
            f"{row['data_bytes_per_request'] / GiB:,.1f}",
            f"{row['scale_bytes_per_request'] / GiB:,.2f}",
            f"{row['total_bytes_per_request'] / GiB:,.1f}",
            f"{row['total_bytes_without_gqa'] / GiB:,.1f}",
        ]
        if batch > 1:
            cells.append(f"{row['total_bytes_batch'] / GiB:,.1f}")
        table.append(cells)
    return _align(table)


def _prefill_lines(rep: dict[str, Any]) -> list[str]:
    pre, n, batch = rep["prefill"], rep["context_len"], rep["batch"]
    flops = pre["flops_per_request"]
    terms = (
        ("dense", "dense", f"2 * {rep['num_params_nonembedding'] / 1e9:.2f}B non-embedding params * N"),
        ("lm_head", "lm head", "2 * hidden * vocab * N"),
        ("attention", "attention", "4 * layers * heads * head_dim * N^2 / 2 (causal)"),
        ("total", "total", ""),
    )
    lines = [
        f"Prefill compute per request (forward FLOPs, N = {n:,} tokens):",
        *(f"  {label:<10} {formula:<48} = {flops[key]:.3e}" for key, label, formula in terms),
        (
            f"  at {pre['mfu']:.0%} MFU of {pre['peak_tflops']:g} TFLOP/s: "
            f"{pre['gpu_seconds_per_request']:,.1f} GPU-seconds, "
            f"${pre['dollars_per_request']:,.4f} per request at ${pre['gpu_price_per_hour']:g}/GPU-hour"
        ),
    ]
    if batch > 1:
        lines.append(
            f"  {batch} requests: {pre['gpu_seconds_batch']:,.1f} GPU-seconds, ${pre['dollars_batch']:,.4f}"
        )
    return lines


def format_report(rep: dict[str, Any]) -> str:
    """The human-readable table of `report`."""
    arch, n, batch = rep["arch"], rep["context_len"], rep["batch"]
    ratio = arch["num_attention_heads"] // arch["num_kv_heads"]
    concurrent = f" (x{batch} concurrent requests in the last column)" if batch > 1 else ""
    lines = [
        (
            f"{arch['name']}: {arch['num_layers']} layers, {arch['num_attention_heads']} query heads, "
            f"{arch['num_kv_heads']} KV heads (GQA {ratio}:1), head_dim {arch['head_dim']}, "
            f"{rep['num_params'] / 1e9:.2f}B params"
        ),
        f"KV cache for one request of {n:,} tokens{concurrent}",
        "",
        *_kv_table(rep),
        "",
        (
            "scales: int8, fp8 (e4m3) = fp16 per (token, KV head) for K and V; "
            f"int4 = fp16 scale + zero per group of {INT4_GROUP_SIZE} (KIVI);"
        ),
        "        no-GQA = total with one KV head per query head.",
        "",
        *_prefill_lines(rep),
    ]
    return "\n".join(lines)


def format_policy_rows(
    rows: list[dict[str, Any]], context_len: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> str:
    """The human-readable table of `policy_rows`."""
    dtypes = list(rows[0]["bytes_per_request"]) if rows else []
    header = ["policy", "tokens kept", "held (blocks)"] + [f"{d} GiB" for d in dtypes]
    table = [header] + [
        [r["policy"], f"{r['tokens_kept']:,}", f"{r['tokens_held']:,}"]
        + [f"{r['bytes_per_request'][d] / GiB:,.2f}" for d in dtypes]
        for r in rows
    ]
    title = (
        f"With an eviction policy (one request of {context_len:,} tokens; whole blocks of {block_size}; "
        "positions are not re-rotated):"
    )
    return "\n".join([title, *_align(table)])


_LENGTH_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*$")
_LENGTH_UNITS = {"": 1, "k": 1024, "m": 1024**2}


def parse_length(text: str | int) -> int:
    """'131072' | '128k' | '1M' | '1.5k' -> tokens; k = 1024, M = 1024**2; must be a positive whole number."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        match = _LENGTH_RE.match(str(text))
        if match is None:
            raise ValueError(
                f"bad length {text!r}: expected a positive number of tokens with an optional "
                "suffix k (x1024) or M (x1024**2), e.g. 131072, 128k, 1M, 1.5k"
            )
        value = float(match.group(1)) * _LENGTH_UNITS[match.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"bad length {text!r}: must be a whole number of tokens >= 1 (got {value:g})")
    return int(value)


def _length_arg(text: str) -> int:
    try:
        return parse_length(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(name: str, upper: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value > 0 and (upper is None or value <= upper)):
            accepted = f"(0, {upper:g}]" if upper is not None else "> 0"
            raise argparse.ArgumentTypeError(f"bad {name} {text!r}: must be a number in {accepted}")
        return value

    return parse


def _batch_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"bad --batch {text!r}: must be an integer >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="checkpoint directory with a config.json, or a preset: "
        f"{', '.join(PRESETS)} (case-insensitive, organisation optional)",
    )
    parser.add_argument(
        "--context",
        type=_length_arg,
        default=DEFAULT_CONTEXT,
        help="tokens per request: 131072, 128k, 1M, 1.5k (k = 1024, M = 1024**2); default 128k",
    )
    parser.add_argument("--batch", type=_batch_arg, default=1, help="concurrent requests (default 1)")
    parser.add_argument(
        "--dtype",
        "--kv-cache-dtype",
        dest="dtype",
        choices=[*KV_DTYPES, *KV_DTYPE_ALIASES],
        default=None,
        help="show only this KV dtype (default: all); fp8_e4m3 is fp8 (vLLM's names)",
    )
    parser.add_argument(
        "--gpu-price-per-hour",
        type=_positive_float("--gpu-price-per-hour"),
        default=DEFAULT_GPU_PRICE_PER_HOUR,
        help=f"$ per GPU-hour (default {DEFAULT_GPU_PRICE_PER_HOUR:g}, a typical H100 rate)",
    )
    parser.add_argument(
        "--mfu",
        type=_positive_float("--mfu", 1.0),
        default=DEFAULT_MFU,
        help=f"model FLOPs utilization in (0, 1] (default {DEFAULT_MFU:g})",
    )
    parser.add_argument(
        "--peak-tflops",
        type=_positive_float("--peak-tflops"),
        default=DEFAULT_PEAK_TFLOPS,
        help=f"peak TFLOP/s of one GPU (default {DEFAULT_PEAK_TFLOPS:g}: H100 SXM bf16 dense)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=None,
        help="also show the bounded size under an eviction policy: window:4096, sinks:4096, "
        "h2o:1024 (heavy = recent), h2o:heavy=512,recent=1536; repeat for one row each",
    )
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of the table"
    )
    parser.epilog = (
        "prefill FLOPs = 2 * non-embedding params * N + 2 * hidden * vocab * N "
        "+ 4 * layers * heads * head_dim * N^2 / 2 (causal); "
        "GPU-seconds = FLOPs / (peak * mfu); $ = GPU-seconds * price / 3600"
    )


def main(args: argparse.Namespace) -> int:
    try:
        model = resolve_model(args.model)
    except (ValueError, FileNotFoundError) as exc:
        print(f"longreach kv-size: {exc}", file=sys.stderr)
        return 2
    rep = report(
        model,
        args.context,
        [check_kv_dtype(args.dtype)] if args.dtype else None,
        args.batch,
        args.peak_tflops,
        args.mfu,
        args.gpu_price_per_hour,
    )
    text = None if args.json else format_report(rep)
    if getattr(args, "policy", None):
        try:
            dtypes = [row["dtype"] for row in rep["kv"]]
            rep["policies"] = policy_rows(model, args.context, dtypes, args.policy)
        except ValueError as exc:
            print(f"longreach kv-size: --policy: {exc}", file=sys.stderr)
            return 2
        text = None if args.json else text + "\n\n" + format_policy_rows(rep["policies"], args.context)
    print(json.dumps(rep, indent=2) if args.json else text)
    return 0
