"""The Triton kernels honour the whole attention contract, beyond matching the reference on valid rows.

Padding rows (past cu_seqlens[-1]) output 0 with lse -inf and get zero gradients; max_seqlen below the
longest sequence, and offsets past the tensors, are rejected on every device; the launcher falls back to
the next config only for configuration errors; a pinned config is the one launched. On CPU the kernels
run under TRITON_INTERPRET=1 (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from _ref_rule import check_all, reference_varlen, run, truth_and_same_precision  # noqa: E402

from longreach.attention import reference, triton_decode, triton_flash  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (ON_GPU or triton_flash.INTERPRET),
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled memory (integers: a large value), so a row a kernel leaves
    unwritten shows, where fresh memory would often be zero by chance. Code that is right never notices."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        with torch.no_grad():
            t.fill_(math.nan if t.is_floating_point() else 12345)
        return t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs)))


def _is_zero(t):
    return torch.equal(t, torch.zeros_like(t))


def _cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)


# ------------------------------------------------------------------------------------------ padding rows


@pytest.mark.parametrize("causal", [True, False])
def test_padding_rows_output_zero_lse_neg_inf_and_zero_gradients(poisoned_allocations, causal):
    seqlens_q, seqlens_k, pad_q, pad_k = [37, 0, 50], [60, 9, 50], 13, 9
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(seqlens_q) + pad_q, 4, 32, generator=g).to(DEVICE)
    k = torch.randn(sum(seqlens_k) + pad_k, 2, 32, generator=g).to(DEVICE)
    v = torch.randn(sum(seqlens_k) + pad_k, 2, 32, generator=g).to(DEVICE)
    dout = torch.randn(q.shape, generator=g).to(DEVICE)
    cu_q, cu_k = _cu(seqlens_q), _cu(seqlens_k)

    def ours(q, k, v):
        return triton_flash.varlen_attention(
            q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), causal=causal, return_lse=True
        )

    out, lse, dq, dk, dv = got = run(ours, q, k, v, dout)
    end_q, end_k = sum(seqlens_q), sum(seqlens_k)
    assert _is_zero(out[end_q:]) and torch.isneginf(lse[:, end_q:]).all()
    assert _is_zero(dq[end_q:]) and _is_zero(dk[end_k:]) and _is_zero(dv[end_k:])
    truth, same = truth_and_same_precision(q, k, v, dout, reference_varlen(cu_q, cu_k, causal=causal))
    check_all(f"padded causal={causal}", got, truth, same)


def test_all_padding_gives_zeros(poisoned_allocations):
    q = torch.randn(6, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(5, 1, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(5, 1, 16, device=DEVICE, requires_grad=True)
    cu = _cu([0, 0])
    out, lse = triton_flash.varlen_attention(q, k, v, cu, cu, 0, 0, causal=True, return_lse=True)
    assert _is_zero(out) and torch.isneginf(lse).all()
    out.sum().backward()
    assert all(_is_zero(t.grad) for t in (q, k, v))


def test_decode_writes_every_sequence_and_head(poisoned_allocations):
    # the split-K decode's outputs, partials included, come from torch.empty: an empty sequence and splits
    # past a sequence's end must still be written (0 and -inf)
    g = torch.Generator().manual_seed(1)
    lengths, block_size = [0, 40, 3], 16
    k_cache = torch.randn(12, block_size, 2, 32, generator=g).to(DEVICE)
    v_cache = torch.randn(12, block_size, 2, 32, generator=g).to(DEVICE)
    table = torch.randperm(12, generator=g)[:12].view(3, 4).to(DEVICE, torch.int32)
    q = torch.randn(3, 4, 32, generator=g).to(DEVICE)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = triton_decode.paged_decode_attention(
        q, k_cache, v_cache, table, seqlens, return_lse=True, num_splits=3
    )
    ref_out, ref_lse = reference.paged_decode_reference(q, k_cache, v_cache, table, seqlens, return_lse=True)
    assert _is_zero(out[0]) and torch.isneginf(lse[0]).all()
    assert (out[1:] - ref_out[1:]).abs().max() < 1e-5 and (lse[1:] - ref_lse[1:]).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------ max_seqlen, offsets


def _qkv(total_q=90, total_k=90):
    return (
        torch.randn(total_q, 2, 16, device=DEVICE),
        torch.randn(total_k, 2, 16, device=DEVICE),
        torch.randn(total_k, 2, 16, device=DEVICE),
    )


@pytest.mark.parametrize("side", ["q", "k"])
def test_max_seqlen_below_the_longest_sequence_is_rejected(side):
    q, k, v = _qkv()
    cu = _cu([30, 50])
    max_q, max_k = (40, 50) if side == "q" else (50, 40)
    with pytest.raises(
        ValueError,
        match=rf"max_seqlen_{side}=40 is below the longest sequence in "
        rf"cu_seqlens_{side} \(50\)",
    ):
        triton_flash.varlen_attention(q, k, v, cu, cu, max_q, max_k)


@pytest.mark.parametrize(
    "lengths,match", [([30, 70], "end at most at the 90 tokens"), ([50, -10], "decreases")]
)
def test_offsets_outside_the_tensors_are_rejected(lengths, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        triton_flash.varlen_attention(q, k, v, _cu(lengths), _cu([10, 10]), 100, 100)
    with pytest.raises(ValueError, match="must start at 0"):
        triton_flash.varlen_attention(q, k, v, _cu([10, 10]), _cu([10, 10]) + 1, 100, 100)


def test_max_seqlen_none_reads_the_offsets():
    q, k, v = _qkv()
    cu = _cu([30, 50])
    assert torch.equal(
        triton_flash.varlen_attention(q, k, v, cu, cu, None, None, causal=True),
        triton_flash.varlen_attention(q, k, v, cu, cu, 50, 50, causal=True),
    )


def test_offsets_changed_in_place_are_read_again():
    # the host read is remembered per tensor (one wait per forward pass, not per layer), but not past a change
    q, k, v = _qkv()
    cu = _cu([30, 50])
    triton_flash.varlen_attention(q, k, v, cu, cu, 50, 50)
    cu[1] = 10  # now [10, 70]
    with pytest.raises(
        ValueError, match=r"max_seqlen_q=50 is below the longest sequence in cu_seqlens_q \(70\)"
    ):
        triton_flash.varlen_attention(q, k, v, cu, cu, 50, 50)


# ------------------------------------------------------------------------------------------ launcher


class _FakeKernel:
    """Stands in for a jitted kernel: records each launch's grid and meta-parameters, raises `error(meta)` if set."""

    def __init__(self, error=None):
        self.launched, self.error = [], error

    def __getitem__(self, grid):
        def launch(**kwargs):
            meta = (
                kwargs.get("BLOCK_M"),
                kwargs.get("BLOCK_N"),
                kwargs.get("num_warps"),
                kwargs.get("num_stages"),
            )
            self.launched.append((grid, meta))
            failure = self.error(meta) if self.error else None
            if failure is not None:
                raise failure

        return launch


_CONFIGS = [
    triton_flash._config(128, 64, 8, 3),
    triton_flash._config(64, 64, 4, 2),
    triton_flash._config(32, 32, 4, 1),
]


def _first_fit_launcher(monkeypatch, kernel):
    monkeypatch.setattr(triton_flash, "INTERPRET", False)
    monkeypatch.setattr(triton_flash, "AUTOTUNE", False)
    return triton_flash.Launcher(kernel, _CONFIGS, ["BLOCK_D"], lambda config, args: True, {})


def test_launcher_lets_a_real_fault_propagate(monkeypatch):
    fault = RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    kernel = _FakeKernel(lambda meta: fault)
    launcher = _first_fit_launcher(monkeypatch, kernel)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        launcher((1,), Q=torch.empty(1, 1, 16), BLOCK_D=16)
    assert len(kernel.launched) == 1 and not launcher.chosen  # no second config on a broken context


def test_launcher_skips_configs_that_fail_a_compile_time_assert(monkeypatch):
    # (out-of-resources errors: test_triton_flash.py's fallback test)
    from triton.compiler.errors import CompileTimeAssertionFailure

    error = CompileTimeAssertionFailure(None, None, "tile too large")
    kernel = _FakeKernel(lambda meta: error if meta[0] > 32 else None)
    launcher = _first_fit_launcher(monkeypatch, kernel)
    launcher((1,), Q=torch.empty(1, 1, 16), BLOCK_D=16)
    assert [meta[0] for _, meta in kernel.launched] == [128, 64, 32]
    assert list(launcher.chosen.values()) == [_CONFIGS[2]]


@pytest.mark.parametrize("interpret", [True, False])
def test_a_pinned_config_is_the_one_launched(monkeypatch, interpret):
    monkeypatch.setattr(triton_flash, "INTERPRET", interpret)
    monkeypatch.setattr(triton_flash, "AUTOTUNE", False)
    kernel = _FakeKernel()
    launcher = triton_flash.Launcher(
        kernel, _CONFIGS, ["BLOCK_D"], lambda config, args: True, {"BLOCK_M": 16, "BLOCK_N": 16}
    )
    launcher((3,), config=_CONFIGS[1], Q=torch.empty(1, 1, 16), BLOCK_D=16)
    assert kernel.launched == [((3,), (64, 64, 4, 2))] and not launcher.chosen


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_candidates_are_the_configs_that_fit(kind):
    # what the GPU tests iterate: the configs the autotuner's prune keeps
    launcher = triton_flash._launcher(kind, 0)
    for block_d, dtype in ((64, torch.bfloat16), (256, torch.float32)):
        fitting = [c for c in launcher.configs if triton_flash._fits(kind, c, block_d, dtype.itemsize)]
        assert launcher.candidates(BLOCK_D=block_d, Q=torch.empty(0, dtype=dtype)) == fitting and fitting


@pytest.mark.parametrize(
    "configs,match",
    [
        ({"bwd": triton_flash._config(32, 32, 4, 1)}, "names kernel 'bwd'"),
        ({"fwd": {"BLOCK_M": 32, "BLOCK_N": 32}}, "must be a triton.Config"),
        (
            {"fwd": triton.Config({"BLOCK_M": 32}, num_warps=4)},
            "must be a triton.Config of BLOCK_M and BLOCK_N",
        ),
    ],
)
def test_bad_pinned_configs_are_rejected(configs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        triton_flash.varlen_attention(q, k, v, _cu([90]), _cu([90]), 90, 90, configs=configs)


def test_pinned_config_must_divide_the_layout_blocks():
    from longreach.attention.masks import BlockSparseLayout

    q, k, v = _qkv(64, 64)
    layout = BlockSparseLayout.from_dense(torch.ones(64, 64, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match="do not divide"):
        triton_flash.varlen_attention(
            q,
            k,
            v,
            _cu([64]),
            _cu([64]),
            64,
            64,
            layout=layout,
            configs={"fwd": triton_flash._config(64, 64, 4, 1)},
        )


@pytest.mark.parametrize(
    "config,match",
    [
        (triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}), "triton.Config of BLOCK_N"),
        (triton.Config({"BLOCK_N": 24}), "power of two"),
    ],
)
def test_decode_rejects_bad_pinned_configs(config, match):
    q = torch.randn(1, 2, 16, device=DEVICE)
    cache = torch.randn(2, 16, 1, 16, device=DEVICE)
    table = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        triton_decode.paged_decode_attention(
            q, cache, cache, table, torch.ones(1, dtype=torch.int32, device=DEVICE), config=config
        )
