"""Decode attention over a paged KV cache, and the write that fills it.

The cache layout is vLLM's PagedAttention / FlashAttention's `flash_attn_with_kvcache`: per layer
`k_cache, v_cache: [num_blocks, block_size, Hkv, D]`; token t of sequence b lives in block
`block_table[b, t // block_size]` at offset `t % block_size`; `cache_seqlens[b]` tokens are valid.
Decode has one query per sequence, the newest token, so the causal mask lets it see the whole
cache; a window (left, right) keeps the last left + 1 keys (right has nothing to cut). GQA: query
head h reads KV head h // (Hq // Hkv). int8 and fp8 e4m3 caches (`kvcache.quant.Int8KV` / `Fp8KV`) come with
`k_scale, v_scale: [num_blocks, block_size, Hkv]`, one scale per (token, KV head): a key or value is
`code * scale`, dequantized where it is read.

`paged_decode_attention` / `write_kv` dispatch to the Triton kernels (Flash-Decoding split-K, see
`triton_decode.py`) for CUDA tensors when Triton imports, and to the PyTorch versions here otherwise.
The PyTorch decode is built for CPU serving (batched, one gather per group of similar-length sequences);
`reference.paged_decode_reference` is the per-sequence oracle both are tested against.
"""

from __future__ import annotations

import math

import torch

from longreach.attention.paged_checks import check_decode_inputs, check_write_inputs
from longreach.kvcache.codecs import fp8_to

# a group's gathered K and V together stay under this, so they are still in cache when the products read them
GROUP_GATHER_BYTES = 8 * 2**20


def gather_rows(source: torch.Tensor, index: torch.Tensor, workspace: dict | None, key: str) -> torch.Tensor:
    """`source.index_select(0, index)`, written into a reused buffer when `workspace` is given: a fresh
    multi-MB tensor per call comes from new pages the kernel must fault in, which made the gather ~10x slower."""
    if workspace is None:
        return source.index_select(0, index)
    rows = index.numel()
    buf = workspace.get(key)
    if buf is None or buf.shape[0] < rows or buf.shape[1:] != source.shape[1:] or buf.dtype != source.dtype:
        buf = torch.empty((max(rows, 1), *source.shape[1:]), dtype=source.dtype, device=source.device)
        workspace[key] = buf
    return torch.index_select(source, 0, index, out=buf[:rows])


def paged_decode_attention_torch(
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    softmax_scale=None,
    window_size=(-1, -1),
    return_lse=False,
    k_scale=None,
    v_scale=None,
    workspace: dict | None = None,
):
    """One query per sequence over its pages, batched: q (B, Hq, D) -> out (B, Hq, D) in q's dtype and, with
    return_lse, lse (B, Hq) fp32 (natural log; an empty sequence gives a zero output and -inf).

    CPU decode is memory-bound, so this reads each needed block once and copies nothing else: sequences are
    sorted by length and cut into groups of similar length (bounding the padding) and of a few MiB (so the
    gathered pages are still cached when read back); each group's blocks are gathered with one
    `index_select` (int8 codes dequantized with their gathered scales) and every KV head's (B, G, D) x
    (B, D, L) product runs as one strided `bmm` (or, with one or two KV heads, all heads as one
    block-diagonal product). Keys at or past `cache_seqlens` (or left of the window) are masked; softmax in
    fp32. workspace: a dict the caller keeps between calls, holding the gather buffers (see `gather_rows`)."""
    batch, num_heads, num_kv_heads, head_dim, block_size = check_decode_inputs(
        q, k_cache, v_cache, block_table, cache_seqlens, window_size, k_scale, v_scale
    )
    dtype = q.dtype if k_scale is not None else k_cache.dtype  # the products' dtype
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = num_heads // num_kv_heads
    out = torch.zeros(batch, num_kv_heads, group, head_dim, dtype=dtype, device=q.device)
    lse = torch.full((batch, num_kv_heads, group), float("-inf"), dtype=torch.float32, device=q.device)
    qg = q.view(batch, num_kv_heads, group, head_dim).to(dtype)  # (B, Hkv, G, D)
    lengths = _host_lengths(cache_seqlens, block_table.shape[1] * block_size)
    max_keys = GROUP_GATHER_BYTES // (
        2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    )
    pages = (k_cache, v_cache, k_scale, v_scale)
    for rows, num_blocks in _length_groups(lengths, block_size, max_keys=max_keys):
        if not max(lengths[r] for r in rows):
            continue  # only empty sequences: 0 and -inf stand
        idx = torch.tensor(rows, device=q.device)
        flat = block_table.index_select(0, idx)[:, :num_blocks].reshape(-1).long()
        k, v = _gather_pages(pages, flat, len(rows), dtype, workspace)  # (n, L, Hkv, D) each
        pos = torch.arange(num_blocks * block_size, device=q.device)[None, :]
        seqlens = cache_seqlens.index_select(0, idx).long()[:, None]
        hidden = pos >= seqlens  # (n, L)
        if window_size[0] >= 0:
            hidden |= pos < seqlens - 1 - window_size[0]
        decode = _block_diagonal_decode if num_kv_heads <= 2 else _per_head_decode
        probs_of = _probabilities(has_empty=not all(lengths[r] for r in rows))
        o, lse_rows = decode(qg.index_select(0, idx), k, v, hidden[:, None, :], scale, probs_of, return_lse)
        out.index_copy_(0, idx, o)
        if return_lse:
            lse.index_copy_(0, idx, lse_rows)
    out = out.view(batch, num_heads, head_dim).to(q.dtype)
    return (out, lse.view(batch, num_heads)) if return_lse else out


def _host_lengths(cache_seqlens: torch.Tensor, capacity: int) -> list[int]:
    """The sequence lengths on the host, each checked against its block table's capacity."""
    lengths = cache_seqlens.tolist()
    bad = next((b for b, n in enumerate(lengths) if not 0 <= n <= capacity), None)
    if bad is not None:
        raise ValueError(
            f"cache_seqlens[{bad}] = {lengths[bad]} is outside 0..{capacity} (block_table width x block_size)"
        )
    return lengths


def _gather_pages(pages, flat: torch.Tensor, n: int, dtype: torch.dtype, workspace: dict | None):
    """K and V of `flat` blocks as (n, L, Hkv, D) in `dtype`; int8 codes times their (gathered) scales."""
    k_cache, v_cache, k_scale, v_scale = pages
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    rows_as = torch.uint8 if k_cache.dtype == torch.float8_e4m3fn else k_cache.dtype  # fp8: gather the bytes
    k = gather_rows(k_cache.view(rows_as), flat, workspace, "k").view(k_cache.dtype)
    v = gather_rows(v_cache.view(rows_as), flat, workspace, "v").view(v_cache.dtype)
    if k_scale is not None:
        to = fp8_to if k.dtype == torch.float8_e4m3fn else torch.Tensor.to  # fp8: exact, vectorized on CPU
        k = to(k, dtype) * k_scale.index_select(0, flat).to(dtype)[..., None]
        v = to(v, dtype) * v_scale.index_select(0, flat).to(dtype)[..., None]
    shape = (n, flat.numel() // n * block_size, num_kv_heads, head_dim)
    return k.view(shape), v.view(shape)


def _probabilities(has_empty: bool):
    """softmax over keys; a row that sees no key (an empty sequence) gets zeros, not NaN. The NaN pass costs a
    read of every score, so it runs only in groups that hold an empty sequence (never in the engine's decode)."""
    if has_empty:
        return lambda scores: scores.softmax(-1).nan_to_num_(0.0)
    return lambda scores: scores.softmax(-1)


def _per_head_decode(q, k, v, hidden, scale, probs_of, want_lse: bool):
    """q (n, Hkv, G, D), k/v (n, L, Hkv, D): a loop over KV heads, not tokens; each is one batched product.
    Returns o (n, Hkv, G, D) and, with want_lse, lse (n, Hkv, G) fp32 (else None: one pass less)."""
    n, num_kv_heads, group, head_dim = q.shape
    o = torch.empty(n, num_kv_heads, group, head_dim, dtype=v.dtype, device=q.device)
    lse = torch.empty(n, num_kv_heads, group, dtype=torch.float32, device=q.device) if want_lse else None
    for h in range(num_kv_heads):
        scores = torch.bmm(q[:, h], k[:, :, h].transpose(1, 2)).float() * scale  # (n, G, L)
        scores.masked_fill_(hidden, float("-inf"))
        if want_lse:
            lse[:, h] = torch.logsumexp(scores, dim=-1)
        torch.bmm(probs_of(scores).to(v.dtype), v[:, :, h], out=o[:, h])  # (n, G, D)
    return o, lse


def _block_diagonal_decode(q, k, v, hidden, scale, probs_of, want_lse: bool):
    """All heads in two contiguous bmm's: q (n, Hkv, G, D) placed block-diagonally against k/v (n, L, Hkv*D).

    Reads K and V once, contiguously, for Hkv times the multiply-adds: faster than per-head strided products
    when there are one or two KV heads (MQA, small GQA models), where decode is bound by memory."""
    n, num_kv_heads, group, head_dim = q.shape
    num_keys = k.shape[1]
    q_bd = q.new_zeros(n, num_kv_heads, group, num_kv_heads, head_dim)
    for h in range(num_kv_heads):
        q_bd[:, h, :, h] = q[:, h]
    q_bd = q_bd.view(n, num_kv_heads * group, num_kv_heads * head_dim)  # (n, Hq, Hkv*D)
    scores = torch.bmm(q_bd, k.reshape(n, num_keys, -1).transpose(1, 2)).float() * scale  # (n, Hq, L)
    scores.masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1).view(n, num_kv_heads, group) if want_lse else None
    probs = probs_of(scores).to(v.dtype)
    o = torch.bmm(probs, v.reshape(n, num_keys, -1))  # (n, Hq, Hkv*D)
    o = o.view(n, num_kv_heads, group, num_kv_heads, head_dim)
    return torch.diagonal(o, dim1=1, dim2=3).permute(0, 3, 1, 2), lse  # (n, Hkv, G, D)


def _length_groups(seqlens: list[int], block_size: int, max_waste: float = 0.25, max_keys: int | None = None):
    """Rows sorted by length, cut so each group's padding to its longest is at most `max_waste` of it and,
    with `max_keys`, its padded keys stay under that many (so its gathered K/V stay in cache while used)."""
    order = sorted(range(len(seqlens)), key=lambda b: seqlens[b], reverse=True)
    groups, rows, width, used = [], [], 0, 0
    for b in order:
        blocks = -(-seqlens[b] // block_size)
        padded = width * (len(rows) + 1)
        if rows and (
            padded - used - blocks > max_waste * padded
            or (max_keys is not None and padded * block_size > max_keys)
        ):
            groups.append((rows, width))
            rows, used = [], 0
        if not rows:
            width = max(blocks, 1)
        rows.append(b)
        used += blocks
    if rows:
        groups.append((rows, width))
    return groups


def write_kv_torch(k, v, k_cache, v_cache, slot_mapping):
    """Scatter new K/V tokens into the paged caches in place.

    k, v: (T, Hkv, D); caches: [num_blocks, block_size, Hkv, D]; slot_mapping: (T,) int64 with
    slot = block_id * block_size + offset, and slot < 0 meaning "skip this token" (padding).
    """
    _, _, _, block_size = check_write_inputs(k, v, k_cache, v_cache, slot_mapping)
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if slot_mapping.numel() == 0:
        return
    num_slots = k_cache.shape[0] * block_size
    if int(slot_mapping.max()) >= num_slots:
        raise ValueError(
            f"slot_mapping holds slot {int(slot_mapping.max())} but the cache has {num_slots} slots"
        )
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


_triton_decode = None
FP8_MIN_CAPABILITY = (8, 9)  # Triton converts e4m3 (tl.float8e4nv) from Ada / Hopper on


def _triton_for(t: torch.Tensor, cache: torch.Tensor | None = None):
    """The Triton module for CUDA tensors when Triton imports; None means use PyTorch. fp8 caches need a GPU
    that converts e4m3 (compute capability 8.9+: Ada, Hopper); older ones dequantize in PyTorch."""
    global _triton_decode
    if not t.is_cuda:
        return None
    if cache is not None and cache.dtype == torch.float8_e4m3fn:
        if torch.cuda.get_device_capability(t.device) < FP8_MIN_CAPABILITY:
            return None
    if _triton_decode is None:
        try:
            from longreach.attention import triton_decode  # lazy: optional heavy dependency (triton)
        except ImportError:
            triton_decode = False
        _triton_decode = triton_decode
    return _triton_decode or None


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    softmax_scale=None,
    window_size=(-1, -1),
    return_lse=False,
    k_scale=None,
    v_scale=None,
    workspace: dict | None = None,
):
    """Paged decode attention: Triton split-K on CUDA, PyTorch elsewhere (each validates its inputs once).
    Shapes as in the PyTorch version (int8 / fp8 caches with their k_scale, v_scale); `workspace` serves the
    PyTorch path's gather buffers and is ignored by the kernel."""
    impl = _triton_for(q, k_cache)
    if impl:
        return impl.paged_decode_attention(
            q,
            k_cache,
            v_cache,
            block_table,
            cache_seqlens,
            softmax_scale=softmax_scale,
            window_size=window_size,
            return_lse=return_lse,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    return paged_decode_attention_torch(
        q,
        k_cache,
        v_cache,
        block_table,
        cache_seqlens,
        softmax_scale=softmax_scale,
        window_size=window_size,
        return_lse=return_lse,
        k_scale=k_scale,
        v_scale=v_scale,
        workspace=workspace,
    )


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write K/V tokens into the paged caches: Triton on CUDA, PyTorch elsewhere."""
    impl = _triton_for(k)
    (impl.write_kv if impl else write_kv_torch)(k, v, k_cache, v_cache, slot_mapping)


__all__ = ["paged_decode_attention", "paged_decode_attention_torch", "write_kv", "write_kv_torch"]
