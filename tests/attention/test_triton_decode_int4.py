"""int4 (KIVI) paged decode with in-kernel dequantization (attention/triton_decode_int4.py) against the PyTorch
path it replaces: `Int4KV.read` (dequantize every key and value) then attention. Small sizes: under
TRITON_INTERPRET=1 the kernel runs in the interpreter."""

from __future__ import annotations

import pytest
import torch
from _ref_rule import check

from longreach.attention import reference
from longreach.kvcache.quant import Int4KV

triton = pytest.importorskip("triton")
from longreach.attention import triton_decode_int4, triton_flash  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    not (ON_GPU or triton_flash.INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"
)


def _store(lengths, num_kv_heads, head_dim, block_size, window, seed=0):
    """An int4 layer store holding random K/V for each sequence (written in two chunks, as the engine does),
    with shuffled blocks; returns the quantizer, store, block table, per-sequence counts and window slots."""
    g = torch.Generator().manual_seed(seed)
    quant = Int4KV(group_size=32, window=window, window_dtype=torch.float32)
    width = max(-(-n // block_size) for n in lengths) + 1
    num_blocks = len(lengths) * width + 2
    store = quant.allocate(num_blocks, block_size, num_kv_heads, head_dim, len(lengths) + 1, DEVICE)
    tables = torch.randperm(num_blocks, generator=g)[: len(lengths) * width].view(len(lengths), width)
    slots = torch.randperm(len(lengths) + 1, generator=g)[: len(lengths)]
    num_quantized = []
    for b, n in enumerate(lengths):
        k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(DEVICE) * 2 + 0.5
        v = torch.randn(n, num_kv_heads, head_dim, generator=g).to(DEVICE)
        table = tables[b].to(DEVICE)
        cut = n // 2
        done = quant.write(store, k[:cut], v[:cut], table, 0, 0, int(slots[b]))
        num_quantized.append(quant.write(store, k[cut:], v[cut:], table, cut, done, int(slots[b])))
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return (
        quant,
        store,
        tables.to(DEVICE, torch.int32),
        as_i32(lengths),
        as_i32(num_quantized),
        slots.to(DEVICE, torch.int32),
    )


@needs_triton
@pytest.mark.parametrize(
    "lengths, num_heads, num_kv_heads, window_size, dtype",
    [
        ([1, 20, 100, 161], 4, 2, (-1, -1), torch.float32),  # all in the window; mixed; mostly quantized
        ([70, 200], 4, 1, (-1, -1), torch.float16),
        ([130, 64], 2, 2, (40, 0), torch.float32),  # a sliding window reaching into the quantized part
    ],
)
def test_int4_in_kernel_decode_matches_dequantize_then_attend(
    lengths, num_heads, num_kv_heads, window_size, dtype
):
    head_dim, block_size, window = 32, 32, 16
    quant, store, table, seqlens, num_quantized, slots = _store(
        lengths, num_kv_heads, head_dim, block_size, window
    )
    assert any(q > 0 for q in num_quantized.tolist())  # some keys come from the blocks
    q = torch.randn(len(lengths), num_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(
        DEVICE, dtype
    )
    out, lse = triton_decode_int4.paged_decode_attention_int4(
        q, store, table, seqlens, num_quantized, slots, window_size=window_size, return_lse=True
    )
    keys, values = [], []
    for b, n in enumerate(lengths):
        k, v = quant.read(
            store, table[b].long(), n, int(num_quantized[b]), int(slots[b]), dtype=torch.float64
        )
        keys.append(k)
        values.append(v)
    k, v = torch.cat(keys), torch.cat(values)  # the PyTorch path's dequantized K/V
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)

    def ref(q, k, v, upcast):
        return reference.varlen_attention(
            q, k, v, cu_q, cu_k, causal=True, window_size=window_size, return_lse=True, upcast=upcast
        )

    high = torch.float64 if dtype == torch.float32 else torch.float32
    truth_out, truth_lse = ref(q.to(high), k.to(high), v.to(high), True)
    same_out, same_lse = ref(q, k.to(dtype), v.to(dtype), False)
    check(f"int4 {lengths} {dtype} out", out, truth_out, same_out)
    check(f"int4 {lengths} {dtype} lse", lse, truth_lse.T, same_lse.T)


def test_int4_decode_names_a_bad_store():
    quant = Int4KV(group_size=32, window=16)
    store = quant.allocate(4, 32, 2, 32, 2, "cpu")
    del store["v_min"]
    q = torch.zeros(1, 4, 32)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="v_min"):
        triton_decode_int4.paged_decode_attention_int4(
            q, store, torch.zeros(1, 2, dtype=torch.int32), one, one * 0, one * 0
        )


@needs_triton
def test_the_engine_decodes_int4_through_the_kernel_with_the_same_tokens(tmp_path, monkeypatch):
    """The int4 layout's decode steps, forced through the in-kernel path (on CUDA it is the default), give the
    tokens of the dequantize-then-attend path; prompts longer than the 128-token window, so blocks are read."""
    from longreach import LLM, SamplingParams
    from longreach.kvcache import paged_gather
    from tests.model.conftest import make_hf_model

    model = make_hf_model(
        "llama",
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
    )
    model.save_pretrained(tmp_path)
    prompts = [[(5 * i + 3 * j) % 120 + 1 for j in range(150 + 40 * i)] for i in range(2)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = {}
    calls = []
    real = paged_gather._int4_decode
    monkeypatch.setattr(paged_gather, "_int4_decode", lambda *a: calls.append(1) or real(*a))
    for forced in (False, True):
        monkeypatch.setattr(paged_gather, "INT4_DECODE_KERNEL", forced)
        llm = LLM(tmp_path, dtype="fp32", kv_cache_dtype="int4", num_kv_blocks=40, device=DEVICE)
        outs[forced] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert calls  # the kernel ran
    assert outs[True] == outs[False]
