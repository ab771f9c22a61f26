"""fp8 (e4m3) KV cache: the codec's error bound, paged storage, decode over fp8 pages (PyTorch, and the Triton
kernel under TRITON_INTERPRET=1), the byte accounting of `kv-size` and the planner's memory plan."""

import json
import math

import pytest
import torch

from longreach.attention.paged import paged_decode_attention_torch
from longreach.attention.reference import paged_decode_reference
from longreach.cli import main as cli_main
from longreach.config import CacheConfig, SchedulerConfig
from longreach.kvcache.codecs import FP8_DTYPE, FP8_MAX, SCALE_DTYPE, dequantize_fp8, fp8_to, quantize_fp8
from longreach.kvcache.paged_cache import PagedKVCache
from longreach.kvcache.planner import plan_kv_cache
from longreach.kvcache.presets import resolve_model
from longreach.kvcache.quant import Fp8KV, Int8KV, make_kv_quantizer, resolve_kv_cache_dtype
from longreach.kvcache.spec import GiB, kv_bytes_per_request, kv_bytes_per_token
from tests.kvcache.test_planner import CFG, CPU

# e4m3 keeps 3 mantissa bits: neighbouring codes in one binade are 2^-3 of its base apart, so round-to-nearest
# is off by at most half that, 2^-4 of the value (normal codes, |x / scale| >= 2^-6); subnormal codes sit 2^-9
# apart, so their error is at most 2^-10 in code units. FP32_SLACK covers the fp32 divide and multiply around it.
RELATIVE_BOUND, SUBNORMAL_BOUND, FP32_SLACK = 2.0**-4, 2.0**-10, 1 + 2.0**-20


def _rows(seed=0):
    """Rows over 10 orders of magnitude, with outliers and an all-zero row: (200, 4, 64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 4, 64, generator=g) * torch.logspace(-6, 4, 200)[:, None, None]
    x[::7, :, ::16] *= 50.0  # channel outliers
    x[3] = 0.0
    return x


def test_round_trip_error_is_within_e4m3s_half_step():
    x = _rows()
    codes, scale = quantize_fp8(x)
    assert codes.dtype == FP8_DTYPE and scale.dtype == SCALE_DTYPE and scale.shape == x.shape[:-1]
    back = dequantize_fp8(codes, scale)
    bound = torch.maximum(RELATIVE_BOUND * x.abs(), SUBNORMAL_BOUND * scale.float()[..., None])
    assert bool(((x - back).abs() <= bound * FP32_SLACK).all())
    # a row's largest element lands on (or one step under) the top code when its scale is an fp16 normal
    # (a subnormal scale is coarse, so it is rounded up further and the codes use less of the range)
    top, normal = codes.float().abs().amax(-1), scale.float() >= 2.0**-14
    assert not torch.isnan(codes.float()).any() and bool((top[normal] >= FP8_MAX * (1 - 2**-3)).all())
    assert bool((back[3] == 0).all()) and bool((torch.sign(back) == torch.sign(x))[back != 0].all())
    # the bound is tight (the worst element uses most of it) and well above int8's on small elements
    assert float(((x - back).abs() / bound.clamp_min(1e-30)).max()) > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_to_reads_every_code_exactly(dtype):
    """The CPU bit move (e4m3 bits into fp16's) gives torch's own cast for all 254 non-NaN codes."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE)
    want, got = codes.to(dtype), fp8_to(codes, dtype)
    is_nan = torch.isnan(want)
    assert got.dtype == dtype and int(is_nan.sum()) == 2 and torch.equal(got[~is_nan], want[~is_nan])


def test_bf16_input_and_a_scale_fp16_cannot_hold_exactly():
    x = (torch.randn(16, 2, 32) * 3).bfloat16()
    codes, scale = quantize_fp8(x)
    back = dequantize_fp8(codes, scale, torch.float32)
    assert bool(((x.float() - back).abs() <= RELATIVE_BOUND * x.float().abs() * FP32_SLACK + 1e-30).all())
    # absmax / 448 below fp16's smallest subnormal: the scale is rounded up, never to zero
    tiny = torch.full((1, 1, 8), 1e-6)
    codes, scale = quantize_fp8(tiny)
    assert float(scale) > 0 and torch.allclose(dequantize_fp8(codes, scale), tiny, rtol=RELATIVE_BOUND)
    # past 448 x fp16's largest scale a row saturates (finite), it does not turn into NaN
    huge = torch.tensor([[1e9, -1e9, 1.0, 0.0]])
    back = dequantize_fp8(*quantize_fp8(huge))
    assert torch.equal(back[0, :2].abs(), torch.full((2,), 448.0 * 65504.0)) and bool(back.isfinite().all())


def test_paged_storage_round_trip_and_layout():
    quantizer = make_kv_quantizer("fp8_e4m3")
    assert isinstance(quantizer, Fp8KV) and quantizer.name == "fp8" and quantizer.attends_stored
    assert resolve_kv_cache_dtype("fp8_e4m3") == resolve_kv_cache_dtype("fp8") == "fp8"
    layout = quantizer.block_layout(16, 2, 64)
    assert {n: (s.shape, s.dtype) for n, s in layout.items()} == {
        "k": ((16, 2, 64), FP8_DTYPE),
        "k_scale": ((16, 2), SCALE_DTYPE),
        "v": ((16, 2, 64), FP8_DTYPE),
        "v_scale": ((16, 2), SCALE_DTYPE),
    }
    assert quantizer.block_bytes(16, 2, 64) == Int8KV().block_bytes(16, 2, 64) == 2 * 16 * 2 * (64 + 2)
    store = quantizer.allocate(6, 16, 2, 64)
    k, v = _rows(1)[:40, :2], _rows(2)[:40, :2]
    table = [4, 0, 5]
    assert quantizer.write(store, k, v, table, 0) == 40
    got_k, got_v = quantizer.read(store, table, 40)
    assert torch.equal(got_k, dequantize_fp8(*quantize_fp8(k)))
    assert torch.equal(got_v, dequantize_fp8(*quantize_fp8(v)))
    assert torch.equal(store["k"][0].float(), quantize_fp8(k[16:32])[0].float())  # logical block 1 -> 0


def _fp8_pages(lengths, num_kv_heads=2, head_dim=32, block_size=4, seed=0):
    """Random K/V for each sequence written into fp8 pages; returns the cache's store, tables, lengths, K/V."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 2
    cache = PagedKVCache(1, num_blocks, block_size, num_kv_heads, head_dim, quantizer=Fp8KV())
    store = cache.stores[0]
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // block_size) for n in lengths)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    for b, n in enumerate(lengths):
        blocks = [order.pop() for _ in range(-(-n // block_size))]
        tables[b, : len(blocks)] = torch.tensor(blocks)
        k = torch.randn(n, num_kv_heads, head_dim, generator=g)
        cache.quantizer.write(store, k, torch.randn(n, num_kv_heads, head_dim, generator=g), blocks, 0)
    return cache, store, tables, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_reads_fp8_pages_with_their_scales(dtype):
    """The batched PyTorch decode over fp8 codes equals the oracle over the dequantized pages, and stays near
    attention over the unquantized K/V: softmax-weighted sums of values each within 2^-4 relative."""
    cache, store, tables, lengths = _fp8_pages([9, 3, 14, 1])
    q = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = paged_decode_attention_torch(
        q, store["k"], store["v"], tables, lengths, k_scale=store["k_scale"], v_scale=store["v_scale"]
    )
    deq = [dequantize_fp8(store[n], store[f"{n}_scale"]) for n in ("k", "v")]
    want = paged_decode_reference(q.float(), deq[0], deq[1], tables, lengths)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the products round to 8 bits of mantissa
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert got.dtype == dtype


@pytest.mark.parametrize("window", [(-1, -1), (6, 0)])
def test_triton_decode_dequantizes_fp8_in_kernel(window):
    """The CUDA route's kernel on fp8 codes (tl.float8e4nv loads); on CPU it runs under TRITON_INTERPRET=1."""
    triton_decode = pytest.importorskip("longreach.attention.triton_decode")
    if not (torch.cuda.is_available() or triton_decode.INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache, store, tables, lengths = _fp8_pages([9, 3, 14])
    store = {name: t.to(device) for name, t in store.items()}
    for dtype in (torch.float32, torch.float16):  # the interpreter has no bf16
        q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        args = (q, store["k"], store["v"], tables.to(device), lengths.to(device))
        scales = dict(k_scale=store["k_scale"], v_scale=store["v_scale"], window_size=window)
        got = triton_decode.paged_decode_attention(*args, **scales)
        want = paged_decode_attention_torch(*args, **scales)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol, rtol=tol)


def test_fp8_error_against_full_precision_decode():
    """Attention over fp8 K/V vs over the fp32 K/V (unit-normal): within 2^-4 of the output scale. Measured
    here 0.017 of outputs up to 0.56; int8's is 4x smaller, 0.0043 (its error is absmax / 254 per row, fp8's
    up to |x| / 16)."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(64, 2, 32, generator=g), torch.randn(64, 2, 32, generator=g)
    q = torch.randn(1, 4, 32, generator=g)
    table, length = torch.arange(16, dtype=torch.int32)[None], torch.tensor([64], dtype=torch.int32)
    exact = paged_decode_reference(q, k.view(16, 4, 2, 32), v.view(16, 4, 2, 32), table, length)
    errors = {}
    for quantizer in (Fp8KV(), Int8KV()):
        store = quantizer.allocate(16, 4, 2, 32)
        quantizer.write(store, k, v, list(range(16)), 0)
        kq, vq = quantizer.read_blocks(store, table)
        out = paged_decode_reference(q, kq.view(16, 4, 2, 32), vq.view(16, 4, 2, 32), table, length)
        errors[quantizer.name] = float((out - exact).abs().max())
    assert errors["int8"] < errors["fp8"] <= RELATIVE_BOUND * float(exact.abs().max())


def test_kv_size_counts_fp8_codes_and_scales(capsys):
    llama70 = resolve_model("Llama-3.1-70B").config  # 80 layers, 8 KV heads, head_dim 128
    per_token = kv_bytes_per_token(llama70, "fp8")
    assert per_token == (160 * 1024, 2 * 80 * 8 * 2) == kv_bytes_per_token(llama70, "fp8_e4m3")
    at_128k = kv_bytes_per_request(llama70, 131072, "fp8")
    assert at_128k.data == 20 * GiB and at_128k.total / GiB == 20.3125  # half of bf16's 40 GiB, + 1.6%
    code = cli_main(["kv-size", "Llama-3.1-70B", "--kv-cache-dtype", "fp8_e4m3", "--json"])
    rows = json.loads(capsys.readouterr().out)["kv"]
    assert code == 0 and [r["dtype"] for r in rows] == ["fp8"]
    assert rows[0]["total_bytes_per_request"] == at_128k.total


def test_memory_plan_with_fp8():
    """Blocks are 1 byte per value plus 2-byte scales per (token, head): in one budget about twice bf16's."""
    sc = SchedulerConfig(max_model_len=256, max_num_seqs=4)
    plan = plan_kv_cache(CFG, CacheConfig(num_blocks=8, kv_cache_dtype="fp8"), sc, torch.bfloat16, CPU)
    assert plan.block_bytes == 2 * 2 * 16 * 2 * (32 + 2)  # layers x K,V x tokens x heads x (codes + scale)
    assert plan.enable_prefix_caching and plan.num_window_slots == 0 and plan.policy is None
    budget = 100 * plan.block_bytes
    fp8 = plan_kv_cache(
        CFG, CacheConfig(kv_cache_memory=budget, kv_cache_dtype="fp8"), sc, torch.bfloat16, CPU
    )
    bf16 = plan_kv_cache(CFG, CacheConfig(kv_cache_memory=budget), sc, torch.bfloat16, CPU)
    assert fp8.num_blocks == 100 and bf16.num_blocks == math.floor(100 * 34 / 64)
    pages = PagedKVCache(CFG.num_hidden_layers, 8, 16, 2, 32, quantizer=plan.quantizer)
    assert pages.block_bytes == plan.block_bytes
    assert sum(t.numel() * t.element_size() for t in pages.stores[0].values()) * 2 == 8 * plan.block_bytes
