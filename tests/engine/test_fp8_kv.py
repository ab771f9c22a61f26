"""The engine with an fp8 (e4m3) KV cache: close to full-precision KV, and exactly its own tokens under any
schedule (batched or alone, chunked or not, preempted, prefix-cache hits)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from longreach import LLM, SamplingParams
from longreach.engine.cuda_graphs import graph_support
from longreach.serve.cli import kv_cache_dtype_kwargs
from tests.engine.test_engine_property import _drive, _make_prompts, scenarios
from tests.engine.test_kv_storage import _compare, _prompts, _run

# Every logit of every step (before greedy tokens diverge) within this fraction of the logits' std of the
# full-precision cache's. Each stored K/V element is off by at most 2^-4 of itself (e4m3's half step); if the
# K and the V errors of a layer both pushed the logits the same way with that full relative size, the logits
# would move by about 2 x 2^-4 = 0.125 of their spread. Errors of random sign mostly cancel in the dot
# products: measured 0.046 here (int8's, with its absmax / 254 steps, is 0.0074).
FP8_LOGIT_TOLERANCE = 2 * 2.0**-4


def _greedy(llm, prompts, max_tokens=12, logits=None):
    """Greedy outputs; with a `logits` dict, each request's sampled logits rows are appended to it."""
    engine = llm.engine
    sampler = engine.sampler

    def recording(rows, seqs):
        for row, seq in enumerate(seqs):
            logits.setdefault(seq.request_id, []).append(rows[row].float().clone())
        return sampler(rows, seqs)

    if logits is not None:
        engine.sampler = recording
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine.sampler = sampler
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "blocks leaked"
    return outs


def test_fp8_kv_stays_close_to_full_precision(tiny_llama):
    ref = _run(tiny_llama[0], block_size=8)
    got = _run(tiny_llama[0], block_size=8, kv_cache_dtype="fp8")
    identical, worst = _compare(ref, got)
    assert worst < FP8_LOGIT_TOLERANCE and identical >= 0.5, (identical, worst)
    # the alias is the same storage, and the pages really hold e4m3 codes
    assert _compare(got, _run(tiny_llama[0], block_size=8, kv_cache_dtype="fp8_e4m3")) == (1.0, 0.0)
    llm = LLM(tiny_llama[0], dtype="bf16", device="cpu", num_kv_blocks=8, kv_cache_dtype="fp8_e4m3")
    store = llm.engine.cache.stores[0]
    assert store["k"].dtype == torch.float8_e4m3fn and store["k_scale"].dtype == torch.float16


def test_fp8_kv_against_bf16_kv_on_a_bf16_model(tiny_llama):
    """The same comparison in the dtype a GPU serves in: fp8 pages vs bf16 pages, bf16 weights."""
    prompts = _prompts()
    kwargs = dict(dtype="bf16", device="cpu", num_kv_blocks=64, block_size=8)
    bf16 = _greedy(LLM(tiny_llama[0], **kwargs), prompts, max_tokens=24)
    fp8 = _greedy(LLM(tiny_llama[0], kv_cache_dtype="fp8", **kwargs), prompts, max_tokens=24)
    same = [
        next((i for i, (a, b) in enumerate(zip(r.token_ids, o.token_ids)) if a != b), len(r.token_ids))
        for r, o in zip(bf16, fp8)
    ]
    assert sum(same) / sum(len(r.token_ids) for r in bf16) >= 0.5, same


def test_fp8_tokens_do_not_depend_on_the_schedule(tiny_llama):
    """Alone with the whole prompt in one step vs batched in 7-token chunks with shared prefixes, preemption
    and prefix-cache hits: identical greedy tokens. A fresh prefill attends its K/V as stored (e4m3), so the
    first chunk of a prompt sees exactly what a later chunk or a decode reads back from the pages: the logits
    agree to fp32 rounding (1e-4 of their std), far inside fp8's own error (0.046 of it, see above), which
    is what they would differ by if a whole prompt's prefill attended its unquantized K/V."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 128, (20,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 1, 30)]
    common = dict(dtype="fp32", device="cpu", block_size=4, kv_cache_dtype="fp8")
    solo, solo_logits = [], []
    for p in prompts:
        logits = {}
        llm = LLM(tiny_llama[0], num_kv_blocks=32, enable_prefix_caching=False, **common)
        solo.append(_greedy(llm, [p], logits=logits)[0].token_ids)
        solo_logits += logits.values()
    llm, logits = LLM(tiny_llama[0], num_kv_blocks=17, max_num_batched_tokens=7, max_num_seqs=4, **common), {}
    batched = _greedy(llm, prompts, logits=logits)
    assert [o.token_ids for o in batched] == solo
    for alone, together in zip(solo_logits, (logits[o.request_id] for o in batched)):
        assert len(together) == len(alone)
        worst = max(float((a - b).abs().max() / a.std()) for a, b in zip(alone, together))
        assert worst < 1e-4, worst
    assert llm.engine.scheduler.num_preemptions > 0  # 17 blocks of 4: the longest request alone needs 16
    assert sum(o.metrics.num_cached_tokens for o in batched) > 0


def test_fp8_prefix_cache_hits_give_the_same_tokens(tiny_llama):
    prompt = _prompts((37,))[0] * 2
    kwargs = dict(dtype="fp32", device="cpu", num_kv_blocks=64, block_size=8, kv_cache_dtype="fp8")
    llm = LLM(tiny_llama[0], **kwargs)
    assert llm.engine.kv_manager.pool.enable_caching
    first = _greedy(llm, [prompt], max_tokens=6)[0]
    again = _greedy(llm, [prompt], max_tokens=6)[0]
    assert again.metrics.num_cached_tokens >= 64 and again.token_ids == first.token_ids
    cold = _greedy(LLM(tiny_llama[0], enable_prefix_caching=False, **kwargs), [prompt], max_tokens=6)[0]
    assert cold.token_ids == first.token_ids


def test_fp8_kv_under_eviction_policies(tiny_llama):
    """Eviction gathers kept keys through the same slot reads (and H2O scores them): fp8 under H2O stays within
    the tolerance of the fp32 cache under the same policy (measured 0.046, as without eviction)."""
    budgets = {"heavy": 16, "recent": 16}
    common = dict(block_size=8, kv_policy="h2o", kv_policy_args=budgets, max_num_batched_tokens=16)
    ref = _run(tiny_llama[0], max_tokens=8, **common)
    identical, worst = _compare(ref, _run(tiny_llama[0], max_tokens=8, kv_cache_dtype="fp8", **common))
    assert worst < FP8_LOGIT_TOLERANCE and identical >= 0.5, (identical, worst)


def test_cuda_graphs_take_fp8_pages_where_the_kernel_reads_them(tiny_llama, monkeypatch):
    """Decode steps over fp8 pages are captured like int8's (the Triton kernel reads the codes as stored), except
    below compute capability 8.9, where the PyTorch decode (host-synchronising) reads them."""
    engine = LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=16, kv_cache_dtype="fp8").engine
    args = (engine.model, engine.runner.layout, engine.cache, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert graph_support(*args) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "compute capability 8.9" in graph_support(*args)


def test_serve_flag_passes_fp8_to_the_engine():
    assert kv_cache_dtype_kwargs("fp8", LLM) == {"kv_cache_dtype": "fp8"}
    assert kv_cache_dtype_kwargs("fp8_e4m3", LLM) == {"kv_cache_dtype": "fp8_e4m3"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp8_kv_decode_matches_cpu(tiny_llama):
    """fp8 KV on CUDA: the Triton decode reading e4m3 codes (sm89+; older GPUs take the PyTorch route) gives
    the CPU path's greedy tokens on an fp32 model, and a bf16 model with a window policy runs to the end."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    tokens = {}
    for device in ("cpu", "cuda"):
        llm = LLM(tiny_llama[0], dtype="fp32", device=device, num_kv_blocks=128, kv_cache_dtype="fp8")
        tokens[device] = [o.token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
    assert tokens["cuda"] == tokens["cpu"]
    llm = LLM(
        tiny_llama[0],
        dtype="bf16",
        device="cuda",
        num_kv_blocks=128,
        kv_cache_dtype="fp8",
        kv_policy="window",
        kv_policy_args={"window": 32},
    )
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    assert all(len(o.token_ids) == 24 for o in outs)
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.num_kv_blocks


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sc=scenarios())
def test_fp8_engine_property_every_request_equals_its_solo_run(tiny_llama, sc):
    """The engine property (test_engine_property.py) with fp8 pages: shared prefixes, arrival steps, 3-64
    token budgets, preemption, aborts and a failed step; every completed request gets its solo run's tokens."""
    prompts = _make_prompts(sc)
    bs = sc["block_size"]
    longest = max(len(p) + m for p, (_, _, m, _) in zip(prompts, sc["requests"]))
    fp8 = dict(dtype="fp32", device="cpu", kv_cache_dtype="fp8")
    llm = LLM(
        tiny_llama[0],
        block_size=bs,
        num_kv_blocks=-(-longest // bs) + 1 + sc["spare_blocks"],
        max_num_seqs=sc["max_num_seqs"],
        max_num_batched_tokens=sc["budget"],
        **fp8,
    )
    done, aborted = _drive(llm.engine, sc, prompts)
    solo = LLM(tiny_llama[0], enable_prefix_caching=False, num_kv_blocks=8, block_size=16, **fp8)
    for i, (prompt, (_, _, max_tokens, _)) in enumerate(zip(prompts, sc["requests"])):
        if i in aborted and i not in done:
            continue
        assert done[i] == _greedy(solo, [prompt], max_tokens=max_tokens)[0].token_ids, i
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.num_kv_blocks
