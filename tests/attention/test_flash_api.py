"""flash_attn_func / flash_attn_varlen_func: parity with the reference under FlashAttention's test rule,
the automatic backend choice, and input validation."""

from __future__ import annotations

import pytest
import torch
from _ref_rule import check_all, reference_varlen, run, truth_and_same_precision

import longreach.attention as attn
from longreach.attention import AttentionMetadata, flash_attn_func, flash_attn_varlen_func, reference


@pytest.fixture(autouse=True)
def _automatic_choice(monkeypatch):
    """The auto-choice tests assume no backend is pinned through the environment."""
    monkeypatch.delenv("LONGREACH_ATTENTION_BACKEND", raising=False)


FULL, CAUSAL, WINDOW, CAUSAL_WINDOW = (
    (False, (-1, -1)),
    (True, (-1, -1)),
    (False, (48, 17)),
    (True, (100, -1)),
)
MHA, GQA, MQA = (4, 4), (6, 2), (4, 1)
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# A trimmed cross product of FlashAttention's grid: head dims {32, 59, 64, 80, 96, 128, 256}, seqlen pairs
# (113, 203) (128, 217) (108, 256) (256, 512) (512, 256) (1023, 1024) (1024, 1023) (1, 239); every value of
# every axis appears several times with rotating partners, and the long pairs stay at moderate head dims.
GRID = [
    (32, 113, 203, MHA, FULL, F32),
    (32, 1023, 1024, GQA, CAUSAL, BF16),
    (32, 512, 256, MQA, CAUSAL, F16),
    (59, 128, 217, MQA, CAUSAL, F16),
    (59, 512, 256, GQA, WINDOW, BF16),
    (59, 1023, 1024, MQA, FULL, F32),
    (64, 256, 512, MHA, CAUSAL_WINDOW, F16),
    (64, 1024, 1023, MQA, CAUSAL, F32),
    (64, 1, 239, GQA, CAUSAL, BF16),
    (80, 113, 203, MQA, WINDOW, BF16),
    (80, 512, 256, MHA, CAUSAL, F16),
    (80, 108, 256, GQA, FULL, BF16),
    (96, 128, 217, GQA, FULL, F32),
    (96, 1023, 1024, MHA, WINDOW, F16),
    (128, 256, 512, MQA, FULL, BF16),
    (128, 108, 256, GQA, CAUSAL_WINDOW, F32),
    (128, 512, 256, MHA, CAUSAL_WINDOW, BF16),
    (256, 113, 203, GQA, CAUSAL, F16),
    (256, 256, 512, MHA, WINDOW, F32),
    (256, 128, 217, MQA, CAUSAL_WINDOW, BF16),
]


def _case_id(case):
    d, sq, sk, (hq, hkv), (causal, window), dtype = case
    return f"d{d}-{sq}x{sk}-h{hq}/{hkv}-{'causal' if causal else 'full'}-w{window[0]},{window[1]}-{str(dtype)[6:]}"


def _inputs(batch, sq, sk, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(batch, sk, hkv, d, generator=g).to(dtype)
    v = torch.randn(batch, sk, hkv, d, generator=g).to(dtype)
    dout = torch.randn(batch, sq, hq, d, generator=g)
    return q, k, v, dout


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_flash_attn_func_parity(case):
    d, sq, sk, (hq, hkv), (causal, window), dtype = case
    batch = 2 if sq * sk < 100_000 else 1
    q, k, v, dout = _inputs(batch, sq, sk, hq, hkv, d, dtype)

    def ref(a, b, c, upcast):  # BSHD through the varlen oracle
        cu_q = torch.arange(batch + 1, dtype=torch.int32) * sq
        cu_k = torch.arange(batch + 1, dtype=torch.int32) * sk
        out, lse = reference.varlen_attention(
            a.flatten(0, 1),
            b.flatten(0, 1),
            c.flatten(0, 1),
            cu_q,
            cu_k,
            causal=causal,
            window_size=window,
            return_lse=True,
            upcast=upcast,
        )
        return out.view(a.shape), lse.view(hq, batch, sq).transpose(0, 1)

    truth, same = truth_and_same_precision(q, k, v, dout, ref)
    backends = ["tiled", "sdpa"]
    if attn.choose_backend(q, *_cu(batch, sq, sk), causal, window) not in backends:
        backends.append(None)
    for backend in backends:
        got = run(
            lambda a, b, c: flash_attn_func(
                a, b, c, causal=causal, window_size=window, return_lse=True, backend=backend
            ),
            q,
            k,
            v,
            dout,
        )
        assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[1].shape == (batch, hq, sq)
        check_all(f"{backend} {_case_id(case)}", got, truth, same)


def _cu(batch, sq, sk):
    return (torch.arange(batch + 1, dtype=torch.int32) * sq, torch.arange(batch + 1, dtype=torch.int32) * sk)


VARLEN_CASES = [
    # seqlens_q, seqlens_k, heads, causal, window, dtype, head dim
    ([113, 0, 256, 37], [203, 17, 256, 37], (4, 2), True, (-1, -1), torch.float16, 64),
    ([64, 300, 5], [64, 120, 5], (3, 3), True, (40, -1), torch.bfloat16, 80),
    ([200, 77, 129], [150, 300, 129], (4, 1), False, (30, 30), torch.float32, 59),
    ([128, 128, 1], [128, 256, 1], (6, 2), False, (-1, -1), torch.bfloat16, 128),
    ([90, 33], [90, 160], (2, 1), True, (16, 8), torch.float16, 32),
    ([17, 250], [17, 250], (4, 4), True, (-1, -1), torch.float32, 256),
    ([100, 60], [217, 60], (8, 2), False, (-1, 20), torch.bfloat16, 96),
]


@pytest.mark.parametrize("seqlens_q,seqlens_k,heads,causal,window,dtype,d", VARLEN_CASES)
def test_flash_attn_varlen_parity(seqlens_q, seqlens_k, heads, causal, window, dtype, d):
    hq, hkv = heads
    meta = AttentionMetadata.from_seqlens(seqlens_q, seqlens_k, causal=causal)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(seqlens_q), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(seqlens_k), hkv, d, generator=g).to(dtype)
    v = torch.randn(sum(seqlens_k), hkv, d, generator=g).to(dtype)
    dout = torch.randn(sum(seqlens_q), hq, d, generator=g)
    truth, same = truth_and_same_precision(
        q,
        k,
        v,
        dout,
        reference_varlen(meta.cu_seqlens_q, meta.cu_seqlens_k, causal=causal, window_size=window),
    )
    for backend in ("tiled", "sdpa", None):
        got = run(
            lambda a, b, c: flash_attn_varlen_func(
                a,
                b,
                c,
                meta.cu_seqlens_q,
                meta.cu_seqlens_k,
                meta.max_seqlen_q,
                meta.max_seqlen_k,
                causal=causal,
                window_size=window,
                return_lse=True,
                backend=backend,
            ),
            q,
            k,
            v,
            dout,
        )
        assert got[1].shape == (hq, sum(seqlens_q))
        check_all(f"varlen {backend}", got, truth, same)


def test_conventions_bottom_right_causal_and_empty_rows():
    """Sq > Sk causal: the first Sq - Sk queries see no key, output 0 and lse -inf; the rest match
    a top-left causal run on the last Sk queries. Sq < Sk: every query sees the whole prefix."""
    q, k, v, _ = _inputs(1, 10, 4, 2, 2, 16, torch.float32)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="tiled")
    assert torch.all(out[:, :6] == 0) and torch.all(lse[:, :, :6] == float("-inf"))
    tail = torch.nn.functional.scaled_dot_product_attention(
        q[:, 6:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out[:, 6:], tail)
    q2, k2, v2, _ = _inputs(1, 1, 9, 2, 2, 16, torch.float32)
    decode = flash_attn_func(q2, k2, v2, causal=True, backend="tiled")
    full = flash_attn_func(q2, k2, v2, causal=False, backend="reference")
    torch.testing.assert_close(decode, full)


def test_lse_is_natural_log_fp32_and_softmax_scale():
    q, k, v, _ = _inputs(2, 33, 47, 4, 2, 32, torch.bfloat16)
    for backend in ("tiled", "sdpa", "reference"):
        out, lse = flash_attn_func(q, k, v, softmax_scale=0.3, return_lse=True, backend=backend)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float().repeat_interleave(2, dim=2)) * 0.3
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 33)
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-4)


def test_attention_entry_point_matches_varlen():
    meta = AttentionMetadata.from_seqlens([50, 70], causal=True)
    q, k, v, _ = _inputs(1, 120, 120, 4, 2, 32, torch.float32)
    q, k, v = q[0], k[0], v[0]
    expected = reference.varlen_attention(
        q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True, window_size=(16, -1)
    )
    for backend in (None, "tiled", "sdpa"):
        torch.testing.assert_close(
            attn.attention(q, k, v, meta, window_size=(16, -1), backend=backend), expected
        )


# ------------------------------------------------------------------ automatic backend choice


def test_auto_backend_choice():
    q = torch.zeros(8, 2, 16)
    same = torch.tensor([0, 8], dtype=torch.int32)
    docs = torch.tensor([0, 3, 8], dtype=torch.int32)
    longer_k = torch.tensor([0, 12], dtype=torch.int32)
    assert attn.choose_backend(q, same, same, causal=True) == "sdpa"
    assert attn.choose_backend(q, docs, docs.clone(), causal=True) == "sdpa"  # one SDPA call per document
    assert attn.choose_backend(q, same, longer_k, causal=False) == "sdpa"
    assert attn.choose_backend(q, same, longer_k, causal=True) == "sdpa"  # CPU: prefix + causal flash calls
    training = q.clone().requires_grad_(True)  # (inference only)
    assert attn.choose_backend(training, same, longer_k, causal=True) == "tiled"
    elsewhere = torch.zeros(8, 2, 16, device="meta")  # not CPU, no Triton: SDPA is
    assert attn.choose_backend(elsewhere, same, longer_k, causal=True) == "tiled"  # top-left aligned
    assert attn.choose_backend(q, same, same, causal=True, window_size=(4, 0)) == "tiled"
    layout = attn.masks.bigbird_layout(8, block_size=4, num_random_blocks=0)
    assert attn.choose_backend(q, same, same, causal=False, layout=layout) == "tiled"
    one_each = torch.tensor([0, 1, 2], dtype=torch.int32)  # decode: one query per sequence
    assert (
        attn.choose_backend(q[:2], one_each, torch.tensor([0, 5, 12], dtype=torch.int32), causal=True)
        == "sdpa"
    )


def test_decode_through_auto_matches_reference():
    meta = AttentionMetadata.from_seqlens([1, 1, 1], [40, 1, 77], causal=True)
    q, k, v, _ = _inputs(1, 3, 118, 4, 2, 32, torch.bfloat16)
    q, k, v = q[0], k[0], v[0]
    args = (q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, 1, 77)
    expected = reference.varlen_attention(*args, causal=True)
    torch.testing.assert_close(flash_attn_varlen_func(*args, causal=True), expected, atol=2e-2, rtol=0)


def test_auto_backend_runs_the_chosen_backend(monkeypatch):
    calls = []
    for name in ("sdpa", "tiled"):
        original = attn.BACKENDS[name]
        monkeypatch.setitem(
            attn.BACKENDS, name, lambda *a, _n=name, _f=original, **kw: calls.append(_n) or _f(*a, **kw)
        )
    q, k, v, _ = _inputs(1, 16, 16, 2, 2, 16, torch.float32)
    flash_attn_func(q, k, v, causal=True)
    flash_attn_func(q, k, v, causal=True, window_size=(3, 0))
    flash_attn_func(q, k[:, :9], v[:, :9], causal=True)
    assert calls == ["sdpa", "tiled", "sdpa"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "seqlens_q,seqlens_k,heads",
    [
        ([1500], [3000], (6, 2)),  # a prefill chunk over twice its keys
        ([64, 7, 200], [64 + 500, 7 + 9, 201], (4, 1)),  # packed chunks, one with a single earlier key
    ],
)
def test_prefill_chunk_after_earlier_keys_on_cpu(seqlens_q, seqlens_k, heads, dtype):
    """Causal with more keys than queries, without gradients (a serving prefill chunk): SDPA's CPU flash kernel
    on the prefix keys and on the diagonal block, merged by log-sum-exp; same answer and lse as the reference."""
    meta = AttentionMetadata.from_seqlens(seqlens_q, seqlens_k, causal=True)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(seqlens_q), heads[0], 64, generator=g).to(dtype)
    k = torch.randn(sum(seqlens_k), heads[1], 64, generator=g).to(dtype)
    v = torch.randn(sum(seqlens_k), heads[1], 64, generator=g).to(dtype)
    args = (meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k)
    truth, truth_lse = reference.varlen_attention(
        q.double(), k.double(), v.double(), *args, causal=True, return_lse=True
    )
    same = reference.varlen_attention(q, k, v, *args, causal=True)
    with torch.no_grad():
        assert attn.choose_backend(q, meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True) == "sdpa"
        out, lse = flash_attn_varlen_func(q, k, v, *args, causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    err, bound = (out.double() - truth).abs().max().item(), (same.double() - truth).abs().max().item()
    assert err <= 2 * bound + 1e-5, (err, bound)
    assert (lse.double() - truth_lse).abs().max().item() < (1e-4 if dtype == torch.float32 else 2e-2)


def test_triton_backend_reports_import_failure(monkeypatch):
    monkeypatch.setattr(attn, "_TRITON", {"fn": None, "error": "ImportError: no module named triton"})
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="triton.*unavailable.*no module named triton"):
        flash_attn_func(q, k, v, backend="triton")
    assert attn.choose_backend(q.flatten(0, 1), *_cu(1, 8, 8), True) == "sdpa"  # never picked on CPU


def test_layout_rejected_by_backend_without_layout_support(monkeypatch):
    monkeypatch.setattr(attn, "_TRITON", {"fn": lambda q, k, v, *a, **kw: q, "error": None})
    layout = attn.masks.bigbird_layout(8, block_size=4, num_random_blocks=0)
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="'triton' does not take a block-sparse layout"):
        flash_attn_func(q, k, v, backend="triton", layout=layout)


# ------------------------------------------------------------------ bad input


def _varlen(q, k, v, cu_q=None, cu_k=None, **kw):
    cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32) if cu_q is None else cu_q
    cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32) if cu_k is None else cu_k
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, q.shape[0], k.shape[0], **kw)


@pytest.mark.parametrize(
    "make,pattern",
    [
        (
            lambda: _varlen(torch.zeros(4, 6, 8), torch.zeros(4, 4, 8), torch.zeros(4, 4, 8)),
            r"query heads \(6\) must be a multiple of KV heads \(4\)",
        ),
        (
            lambda: _varlen(torch.zeros(4, 2, 8), torch.zeros(4, 2, 16), torch.zeros(4, 2, 16)),
            r"head dims differ: q 8, k 16, v 16",
        ),
        (
            lambda: _varlen(
                torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), window_size=(-2, 3)
            ),
            r"window_size .* got \(-2, 3\)",
        ),
        (
            lambda: _varlen(
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                cu_q=torch.tensor([0, 4]),
                cu_k=torch.tensor([0, 4]),
            ),
            r"cu_seqlens_q must be a 1-D int32 tensor .* got torch.int64",
        ),
        (
            lambda: _varlen(
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                cu_q=torch.tensor([0, 2, 4], dtype=torch.int32),
            ),
            r"cu_seqlens_q has 3 entries but cu_seqlens_k has 2",
        ),
        (
            lambda: _varlen(
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                cu_q=torch.tensor([0, 5], dtype=torch.int32),
            ),
            r"cu_seqlens_q=\[0, 5\] .* 4 tokens",
        ),
        (
            lambda: _varlen(
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                torch.zeros(4, 2, 8),
                cu_q=torch.tensor([0, 3, 2], dtype=torch.int32),
                cu_k=torch.tensor([0, 2, 4], dtype=torch.int32),
            ),
            r"cu_seqlens_q=\[0, 3, 2\] must start at 0, never decrease.*it decreases",
        ),
        (
            lambda: flash_attn_varlen_func(
                torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), *_cu(1, 4, 4), 3, 4
            ),
            r"max_seqlen_q=3 is below the longest sequence in cu_seqlens_q \(4\)",
        ),
        (
            lambda: _varlen(
                torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), backend="flashy"
            ),
            r"unknown attention backend 'flashy'",
        ),
        (
            lambda: _varlen(
                torch.zeros(4, 2, 8), torch.zeros(4, 2, 8, dtype=torch.float16), torch.zeros(4, 2, 8)
            ),
            r"share one dtype .* torch.float32, torch.float16",
        ),
        (
            lambda: flash_attn_func(
                torch.zeros(1, 4, 2, 8), torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
            ),
            r"batch sizes differ: q 1, k 2, v 2",
        ),
        (
            lambda: flash_attn_func(
                torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), dropout_p=0.1
            ),
            r"dropout_p=0.1",
        ),
        (
            lambda: flash_attn_func(
                torch.zeros(1, 40, 2, 8),
                torch.zeros(1, 40, 2, 8),
                torch.zeros(1, 40, 2, 8),
                layout=attn.masks.bigbird_layout(16, block_size=8),
            ),
            r"layout has 2x2 blocks of 8 but sequences up to 40x40 tokens need 5x5",
        ),
    ],
)
def test_bad_inputs_raise_value_error(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_max_seqlen_none_is_read_from_the_offsets():
    q = torch.zeros(10, 2, 8)
    cu_q, cu_k = torch.tensor([0, 3, 10], dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32)
    assert attn.check_varlen_inputs(q, q[:6], q[:6], cu_q, cu_k) == (7, 4)
    assert attn.check_varlen_inputs(q, q[:6], q[:6], cu_q, cu_k, 9, 5) == (9, 5)


def _backends_that_run_here():
    names = ["reference", "tiled", "sdpa"]
    triton_fn = attn._load_triton()
    if triton_fn is not None and (torch.cuda.is_available() or attn.triton_flash.INTERPRET):
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", _backends_that_run_here())
def test_inputs_are_checked_once_per_call(backend, monkeypatch):
    """The public entry checks; the backend it calls does not check again (the Triton backend's direct
    entry would run the same check: counted too)."""
    calls = []
    checked = attn.check_varlen_inputs
    counting = lambda *a, **kw: calls.append(1) or checked(*a, **kw)  # noqa: E731
    monkeypatch.setattr(attn, "check_varlen_inputs", counting)
    if backend == "triton":
        monkeypatch.setattr(attn.triton_flash, "check_varlen_inputs", counting)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k, v, _ = (t.to(device) for t in _inputs(2, 16, 24, 2, 1, 16, torch.float32))
    flash_attn_func(q, k, v, causal=True, backend=backend)
    assert len(calls) == 1
    meta = AttentionMetadata.from_seqlens([16, 16], [24, 24], device=device)
    attn.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), meta, backend=backend)
    assert len(calls) == 2


def test_environment_pins_the_backend(monkeypatch):
    q = torch.zeros(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    monkeypatch.setenv("LONGREACH_ATTENTION_BACKEND", "tiled")
    assert attn.choose_backend(q, cu, cu, causal=True) == "tiled"
    monkeypatch.setenv("LONGREACH_ATTENTION_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LONGREACH_ATTENTION_BACKEND='fastest'"):
        attn.choose_backend(q, cu, cu, causal=True)
