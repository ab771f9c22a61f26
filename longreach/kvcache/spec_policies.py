"""`longreach kv-size --policy window:4096`: the KV bytes of one request under an eviction policy.

A policy (`kvcache.policies`) bounds the tokens a request keeps, so its cache stops growing with the
context: between steps it holds at most `max_held_blocks(block_size)` blocks, whatever the context length.
The bound is counted in whole blocks (a partly evicted block is still held), which is what the engine's pool
pays; one decode step adds at most one block. Bytes per token come from `spec.kv_bytes_per_token`.
"""
from __future__ import annotations

from typing import Any

from longreach.kvcache.spec import GiB, ArchSpec, kv_bytes_per_token

DEFAULT_BLOCK_SIZE = 16


def policy_rows(arch: ArchSpec, context_len: int, dtypes: list[str], specs: list[str],
                block_size: int = DEFAULT_BLOCK_SIZE) -> list[dict[str, Any]]:
    """One row per policy spec ('none', 'window:4096', 'sinks:window=4096,num_sinks=4', 'h2o:1024', ...):
    tokens kept, tokens held in whole blocks, and bytes per request for each dtype."""
    from longreach.kvcache.policies import make_policy, parse_policy_spec

    rows = []
    for spec in specs:
        name, kwargs = parse_policy_spec(spec)
        policy = make_policy(name, **kwargs)
        kept, blocks = policy.max_kept_tokens(block_size), policy.max_held_blocks(block_size)
        held = context_len if blocks is None else min(context_len, blocks * block_size)
        kept = context_len if kept is None else min(context_len, kept)
        row = {"policy": spec, "tokens_kept": kept, "tokens_held": held, "bytes_per_request": {}}
        for dtype in dtypes:
            data, scales = kv_bytes_per_token(arch, dtype)
            row["bytes_per_request"][dtype] = (data + scales) * held
        rows.append(row)
    return rows


def format_policy_rows(rows: list[dict[str, Any]], context_len: int, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    dtypes = list(rows[0]["bytes_per_request"]) if rows else []
    header = ["policy", "tokens kept", "held (blocks)"] + [f"{d} GiB" for d in dtypes]
    table = [header] + [[r["policy"], f"{r['tokens_kept']:,}", f"{r['tokens_held']:,}"]
                        + [f"{r['bytes_per_request'][d] / GiB:,.2f}" for d in dtypes] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [f"With an eviction policy (one request of {context_len:,} tokens; whole blocks of {block_size}; "
             "positions are not re-rotated):"]
    lines += ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in table]
    return "\n".join(lines)
