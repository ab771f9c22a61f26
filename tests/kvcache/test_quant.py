"""KV cache quantization: element error bounds, paged storage round trips, attention error, byte accounting."""

import pytest
import torch

from longreach.attention.reference import attention_one
from longreach.kvcache.codecs import (
    dequantize_int4_per_channel,
    dequantize_int4_per_token,
    dequantize_int8,
    pack_int4,
    quantize_int4_per_channel,
    quantize_int4_per_token,
    quantize_int8,
    unpack_int4,
)
from longreach.kvcache.presets import PRESETS
from longreach.kvcache.quant import (
    KV_CACHE_DTYPES,
    FullPrecisionKV,
    Int4KV,
    Int8KV,
    check_kv_cache_dtype,
    kv_window_bytes_per_sequence,
    make_kv_quantizer,
    resolve_kv_cache_dtype,
)
from longreach.kvcache.spec import kv_bytes_per_request, kv_bytes_per_token

# |x - dequant(x)| <= scale / 2, up to fp32 rounding of the arithmetic itself
SLACK = 1 + 1e-5


def _kv(num_tokens, num_heads=2, head_dim=64, seed=0, outliers=0.0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k[..., ::16] += outliers  # KIVI: key outliers sit in fixed channels
    return k, torch.randn(num_tokens, num_heads, head_dim, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_error_at_most_half_scale(dtype):
    x, _ = _kv(64, outliers=6.0)
    x[3, 1] = 0.0  # an all-zero (token, head) row
    x[5, 0, 7] = 300.0  # an outlier inflates only its own row's scale
    x = x.to(dtype)
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.dtype == torch.float16 and scale.shape == x.shape[:-1]
    err = (dequantize_int8(codes, scale) - x.float()).abs()
    assert (err <= scale.float()[..., None] / 2 * SLACK).all()
    assert err[3, 1].max() == 0 and codes.abs().max() <= 127


def test_pack_unpack_int4_round_trip():
    codes = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        pack_int4(codes[:, :, 0])


def test_int4_error_at_most_half_group_scale():
    k, v = _kv(64, outliers=6.0)
    packed, scale, minimum = quantize_int4_per_channel(k, 32)  # keys: groups of 32 tokens per channel
    assert packed.shape == (64, 2, 32) and scale.shape == minimum.shape == (2, 2, 64)
    err = (dequantize_int4_per_channel(packed, scale, minimum, 32) - k).abs()
    assert (err <= scale.float().repeat_interleave(32, dim=0) / 2 * SLACK).all()

    packed, scale, minimum = quantize_int4_per_token(v, 32)  # values: groups of 32 channels per token
    assert packed.shape == (64, 2, 32) and scale.shape == minimum.shape == (64, 2, 2)
    err = (dequantize_int4_per_token(packed, scale, minimum, 32) - v).abs()
    assert (err <= scale.float().repeat_interleave(32, dim=-1) / 2 * SLACK).all()

    constant = torch.full((32, 1, 32), 0.3)  # zero span: exact up to fp16 min rounding
    packed, scale, minimum = quantize_int4_per_channel(constant, 32)
    assert (dequantize_int4_per_channel(packed, scale, minimum, 32) - constant).abs().max() < 1e-3


def test_per_channel_keys_beat_per_token_keys_with_channel_outliers():
    """KIVI's reason for per-channel keys, on keys whose outliers sit in fixed channels."""
    k, _ = _kv(256, outliers=8.0)
    per_channel = dequantize_int4_per_channel(*quantize_int4_per_channel(k))
    per_token = dequantize_int4_per_token(*quantize_int4_per_token(k))
    assert (per_channel - k).abs().mean() < 0.5 * (per_token - k).abs().mean()


def _write_in_chunks(quantizer, store, k, v, table, chunks, slot=0):
    start, num_quantized = 0, 0
    for n in chunks:
        num_quantized = quantizer.write(
            store, k[start : start + n], v[start : start + n], table, start, num_quantized, window_slot=slot
        )
        start += n
    return start, num_quantized


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8"])
def test_token_local_storage_round_trip(name):
    quantizer = make_kv_quantizer(name, torch.float32)
    k, v = _kv(70)
    store = quantizer.allocate(num_blocks=8, block_size=16, num_kv_heads=2, head_dim=64)
    table = [5, 2, 7, 0, 3]  # shuffled physical blocks
    length, num_quantized = _write_in_chunks(quantizer, store, k, v, table, [9, 1, 40, 1, 19])
    assert length == num_quantized == 70
    keys, values = quantizer.read(store, table, 70)
    if name == "int8":
        for got, want in ((keys, k), (values, v)):
            _, scale = quantize_int8(want)
            assert ((got - want).abs() <= scale.float()[..., None] / 2 * SLACK).all()
    else:
        assert torch.equal(keys, k.to(quantizer.dtype).float()) and torch.equal(
            values, v.to(quantizer.dtype).float()
        )
    # batched (vLLM slot-mapping) writes and whole-block reads see the same data
    other = quantizer.allocate(8, 16, 2, 64)
    slots = torch.tensor([table[t // 16] * 16 + t % 16 for t in range(70)])
    quantizer.write_slots(other, k, v, slots)
    padded_k, padded_v = quantizer.read_blocks(other, torch.tensor([table]))
    assert padded_k.shape == (1, 80, 2, 64)
    assert torch.equal(padded_k[0, :70], keys) and torch.equal(padded_v[0, :70], values)


def test_int8_layout():
    layout = Int8KV().block_layout(block_size=16, num_kv_heads=8, head_dim=128)
    assert {name: (s.shape, s.dtype) for name, s in layout.items()} == {
        "k": ((16, 8, 128), torch.int8),
        "k_scale": ((16, 8), torch.float16),
        "v": ((16, 8, 128), torch.int8),
        "v_scale": ((16, 8), torch.float16),
    }


def test_int4_layout_and_window_rule():
    quantizer = Int4KV(group_size=32, window=64, window_dtype=torch.float32)
    layout = quantizer.block_layout(block_size=64, num_kv_heads=2, head_dim=64)
    assert {name: s.shape for name, s in layout.items()} == {
        "k": (64, 2, 32),
        "k_scale": (2, 2, 64),
        "k_min": (2, 2, 64),
        "v": (64, 2, 32),
        "v_scale": (64, 2, 2),
        "v_min": (64, 2, 2),
    }
    assert quantizer.window_layout(2, 64)["k_window"].shape == (96, 2, 64)
    assert [quantizer.num_quantized_for(n) for n in (0, 64, 95, 96, 127, 128, 300)] == [
        0,
        0,
        0,
        32,
        32,
        64,
        224,
    ]


def test_int4_storage_matches_one_shot_quantization_whatever_the_chunking():
    quantizer = Int4KV(group_size=32, window=64, window_dtype=torch.float32)
    k, v = _kv(300, outliers=4.0)
    table = [6, 0, 9, 3, 1]  # 5 blocks of 64 tokens
    results = []
    for chunks in ([300], [1] * 300, [7, 100, 1, 1, 64, 127]):
        store = quantizer.allocate(
            num_blocks=10, block_size=64, num_kv_heads=2, head_dim=64, num_window_slots=3
        )
        length, num_quantized = _write_in_chunks(quantizer, store, k, v, table, chunks, slot=2)
        assert num_quantized == quantizer.num_quantized_for(300) == 224
        results.append(quantizer.read(store, table, length, num_quantized, window_slot=2))
    for keys, values in results[1:]:  # codes depend only on a group's tokens
        assert torch.equal(keys, results[0][0]) and torch.equal(values, results[0][1])
    keys, values = results[0]
    assert torch.equal(keys[224:], k[224:]) and torch.equal(values[224:], v[224:])  # the window is exact
    want_k = dequantize_int4_per_channel(*quantize_int4_per_channel(k[:224]))
    want_v = dequantize_int4_per_token(*quantize_int4_per_token(v[:224]))
    assert torch.equal(keys[:224], want_k) and torch.equal(values[:224], want_v)


def test_int4_prefix_hit_state():
    """A prefix-cache hit hands over sealed blocks: num_quantized = the hit length, an empty window."""
    quantizer = Int4KV(group_size=32, window=32, window_dtype=torch.float32)
    k, v = _kv(160)
    table = [1, 0, 2]
    store = quantizer.allocate(3, 64, 2, 64, num_window_slots=2)
    _write_in_chunks(quantizer, store, k, v, table, [160], slot=0)  # quantized: [0, 128)
    num_quantized = quantizer.write(
        store, k[128:140], v[128:140], table, 128, num_quantized=128, window_slot=1
    )
    assert num_quantized == 128
    keys, _ = quantizer.read(store, table, 140, num_quantized, window_slot=1)
    assert torch.equal(keys[128:], k[128:140])


def _attention_errors(seqlen=1024, outliers=0.0):
    k, v = _kv(seqlen, num_heads=2, head_dim=64, seed=1, outliers=outliers)
    q = torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(2))
    ref, _ = attention_one(q, k, v, causal=True)
    table = list(range(seqlen // 64))
    errors = {}
    for name in ("bf16", "int8", "int4"):
        quantizer = make_kv_quantizer(name, torch.float32)
        store = quantizer.allocate(len(table), 64, 2, 64, num_window_slots=1)
        num_quantized = quantizer.write(store, k, v, table, 0, window_slot=0)
        keys, values = quantizer.read(store, table, seqlen, num_quantized, window_slot=0)
        out, _ = attention_one(q, keys, values, causal=True)
        errors[name] = (out - ref).abs().max().item()
    return errors


@pytest.mark.parametrize("outliers", [0.0, 4.0])
def test_attention_error_with_quantized_kv(outliers):
    """16 queries over 1024 unit-normal keys/values (Hq=8, Hkv=2, D=64), vs. fp32 attention.

    Stated tolerances (max abs error of the output): bf16 KV ~7e-4; int8 <= 0.01 (measured 2-3e-3) and at most
    8x the bf16 error; int4 (KIVI, window 128) <= 0.06 (measured 0.023-0.026), above int8.
    """
    errors = _attention_errors(outliers=outliers)
    assert errors["bf16"] < 1.5e-3
    assert errors["int8"] <= 0.01 and errors["int8"] <= 8 * errors["bf16"]
    assert errors["int8"] < errors["int4"] <= 0.06


def test_dtype_names_and_validation():
    assert KV_CACHE_DTYPES == ("auto", "bf16", "fp16", "fp32", "int8", "fp8", "fp8_e4m3", "int4")
    assert resolve_kv_cache_dtype("auto", torch.float16) == "fp16"
    assert isinstance(make_kv_quantizer("auto", torch.bfloat16), FullPrecisionKV)
    with pytest.raises(ValueError, match="'int3'"):
        check_kv_cache_dtype("int3")
    with pytest.raises(ValueError, match="'fp8_e5m2'"):
        make_kv_quantizer("fp8_e5m2")
    with pytest.raises(ValueError, match=r"block_size \(16\)"):
        Int4KV().block_layout(16, 2, 64)
    with pytest.raises(ValueError, match=r"head_dim \(16\)"):
        Int4KV().block_layout(64, 2, 16)
    with pytest.raises(ValueError, match="window=-1"):
        Int4KV(window=-1)
    with pytest.raises(ValueError, match="num_window_slots=0"):
        Int4KV().allocate(4, 64, 2, 64)
    quantizer = Int4KV(window=32)
    store = quantizer.allocate(4, 64, 2, 64, num_window_slots=1)
    k, v = _kv(8)
    with pytest.raises(ValueError, match="window_slot.*None"):
        quantizer.write(store, k, v, [0], 0)
    with pytest.raises(ValueError, match="num_quantized=16"):
        quantizer.write(store, k, v, [0], 40, num_quantized=16, window_slot=0)
    with pytest.raises(ValueError, match="block table has 1 blocks"):
        Int8KV().write(Int8KV().allocate(4, 16, 2, 64), *_kv(20), [0], 0)


def test_bytes_per_token_match_spec():
    # a block's stored bytes are exactly block_size tokens' worth of the calculator's bytes per token
    for preset in PRESETS.values():
        config = preset.config
        for name in ("bf16", "fp16", "int8", "int4"):
            block_bytes = make_kv_quantizer(name).block_bytes(64, config.num_key_value_heads, config.head_dim)
            assert config.num_hidden_layers * block_bytes == 64 * kv_bytes_per_token(config, name).total
    # Llama-3.1-70B at 128K: 40 GiB bf16; int8 20.3 GiB; int4 12.5 GiB (+ a 2.5 MiB window per sequence)
    config = PRESETS["meta-llama/Llama-3.1-70B"].config
    gib = {
        name: kv_bytes_per_request(config, 131072, name).total / 2**30 for name in ("bf16", "int8", "int4")
    }
    assert gib == pytest.approx({"bf16": 40.0, "int8": 20.3125, "int4": 12.5})
    assert kv_window_bytes_per_sequence("int4", 80, 8, 128) == 80 * 2 * 160 * 8 * 128 * 2
    assert kv_window_bytes_per_sequence("int8", 80, 8, 128) == 0


class _QuantizedCache:
    """The smallest engine-side user of the API: one sequence, one block table, the model's `attend` hook."""

    def __init__(self, quantizer, cfg, num_blocks=2, block_size=64):
        self.quantizer, self.table, self.length = quantizer, list(range(num_blocks)), 0
        self.stores = [
            quantizer.allocate(
                num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, num_window_slots=1
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        self.num_quantized = [0] * cfg.num_hidden_layers

    def attend(self, layer_idx, q, k, v, meta, window_size):
        from longreach.attention import flash_attn_varlen_func

        num_new, end = k.shape[0], self.length + k.shape[0]
        self.num_quantized[layer_idx] = self.quantizer.write(
            self.stores[layer_idx],
            k,
            v,
            self.table,
            self.length,
            self.num_quantized[layer_idx],
            window_slot=0,
        )
        keys, values = self.quantizer.read(
            self.stores[layer_idx],
            self.table,
            end,
            self.num_quantized[layer_idx],
            window_slot=0,
            dtype=q.dtype,
        )
        cu_q, cu_k = torch.tensor([0, num_new], dtype=torch.int32), torch.tensor([0, end], dtype=torch.int32)
        return flash_attn_varlen_func(q, keys, values, cu_q, cu_k, num_new, end, causal=True)


def test_model_logits_with_quantized_kv_cache(tmp_path):
    """A tiny random Llama (head_dim 64, 2 layers) prefills 100 tokens in chunks, then decodes 20 one by one
    through each KV dtype; relative L2 error of every step's logits vs. the uncached fp32 forward.
    Stated tolerances: bf16 < 1%, int8 < 2%, int4 (group 32, window 32) < 10%, int8 < int4
    (measured 0.13%, 0.48%, 2.6%)."""
    from longreach.attention import AttentionMetadata
    from longreach.model.loader import load_model
    from tests.model.conftest import make_hf_model

    make_hf_model(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=192,
        max_position_embeddings=256,
    ).save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    ids = torch.randint(0, 128, (120,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)  # (120, V)
        errors = {}
        for name in ("bf16", "int8", "int4"):
            cache = _QuantizedCache(
                Int4KV(32, 32, torch.float32) if name == "int4" else make_kv_quantizer(name), model.config
            )
            logits = []
            for chunk in [37, 63] + [1] * 20:
                start = cache.length
                meta = AttentionMetadata.from_seqlens([chunk])
                logits.append(
                    model(ids[start : start + chunk], torch.arange(start, start + chunk), meta, cache)
                )
                cache.length += chunk
            got = torch.cat(logits)
            errors[name] = ((got - want).norm() / want.norm()).item()
    assert errors["bf16"] < 0.01 and errors["int8"] < 0.02 and errors["int8"] < errors["int4"] < 0.10, errors
