"""KV cache dtypes and weight quantization in the engine: int8 / int4 KV against a full-precision cache,
int8 weights, block accounting, and the errors for combinations the cache cannot honour."""

import pytest
import torch

from longreach import LLM, SamplingParams
from tests.model.conftest import make_hf_model

# int8 KV: every logit of every step within this fraction of the logits' spread (std) of the fp32 cache's
INT8_LOGIT_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama with head_dim 32 (int4 KV groups run along head_dim in 32s)."""
    model = make_hf_model(
        "llama",
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
    )
    path = tmp_path_factory.mktemp("wide-llama")
    model.save_pretrained(path)
    return path


def _prompts(lengths=(37, 70, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (length,), generator=g).tolist() for length in lengths]


def _run(path, max_tokens=24, lengths=(37, 70, 5), **kwargs):
    """(outputs, logits per request per step): the sampler is wrapped to record the logits it sees."""
    llm = LLM(path, dtype="fp32", device="cpu", num_kv_blocks=kwargs.pop("num_kv_blocks", 64), **kwargs)
    engine, logits_of = llm.engine, {}
    sampler = engine.sampler

    def recording(logits, seqs):
        for row, seq in enumerate(seqs):
            logits_of.setdefault(seq.request_id, []).append(logits[row].float().clone())
        return sampler(logits, seqs)

    engine.sampler = recording
    outs = llm.generate(
        _prompts(lengths),
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "blocks leaked"
    assert engine.kv_states.states == {} and engine.kv_cache_bytes_used == 0
    engine.kv_manager.check_invariants()
    return outs, [logits_of[o.request_id] for o in outs]


def _compare(ref, got):
    """(fraction of greedy tokens identical, worst logit error / logit std over steps before a divergence)."""
    (ref_outs, ref_logits), (outs, logits) = ref, got
    same = total = 0
    worst = 0.0
    for r, o, rl, ol in zip(ref_outs, outs, ref_logits, logits):
        total += len(r.token_ids)
        diverged = next(
            (i for i, (a, b) in enumerate(zip(r.token_ids, o.token_ids)) if a != b), len(r.token_ids)
        )
        same += diverged
        for a, b in zip(rl[: diverged + 1], ol[: diverged + 1]):  # same inputs up to the first divergence
            worst = max(worst, float((a - b).abs().max() / a.std()))
    return same / total, worst


def test_int8_kv_stays_close_to_fp32(tiny_llama):
    ref = _run(tiny_llama[0], block_size=8)
    got = _run(tiny_llama[0], block_size=8, kv_cache_dtype="int8")
    identical, worst = _compare(ref, got)
    assert worst < INT8_LOGIT_TOLERANCE and identical >= 0.9, (identical, worst)
    # bf16 storage of an fp32 model goes through the same dequantizing paths
    _, worst_bf16 = _compare(ref, _run(tiny_llama[0], block_size=8, kv_cache_dtype="bf16"))
    assert worst_bf16 < INT8_LOGIT_TOLERANCE


def test_int8_kv_chunked_prefill_and_prefix_hits(tiny_llama):
    """Continued prefill chunks read int8 pages through read_slots; prefix-cache hits share int8 blocks."""
    ref = _run(tiny_llama[0], block_size=8, max_num_batched_tokens=16, max_tokens=6)
    got = _run(tiny_llama[0], block_size=8, max_num_batched_tokens=16, max_tokens=6, kv_cache_dtype="int8")
    assert _compare(ref, got)[1] < INT8_LOGIT_TOLERANCE
    llm = LLM(
        tiny_llama[0], dtype="fp32", device="cpu", num_kv_blocks=64, block_size=8, kv_cache_dtype="int8"
    )
    prompt = _prompts((37,))[0] * 2
    first = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    again = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert again.metrics.num_cached_tokens >= 64 and again.token_ids == first.token_ids


def test_int4_kv_runs_end_to_end(wide_llama):
    """Past KIVI's 128-token full-precision window, so the blocks hold 4-bit keys and values."""
    lengths = (230, 300, 5)
    ref = _run(wide_llama, max_tokens=40, lengths=lengths, block_size=32)
    got = _run(wide_llama, max_tokens=40, lengths=lengths, kv_cache_dtype="int4", max_num_batched_tokens=64)
    identical, worst = _compare(ref, got)
    assert identical >= 0.5 and 1e-4 < worst < 0.5, (identical, worst)
    out = got[0][1]
    assert out.metrics.max_kv_blocks == 11  # 300 + 40 tokens in blocks of 32 (the default with int4)
    llm = LLM(wide_llama, dtype="fp32", device="cpu", num_kv_blocks=8, kv_cache_dtype="int4")
    assert llm.engine.cache_config.block_size == 32 and not llm.engine.kv_manager.pool.enable_caching


def test_bad_kv_settings_name_the_values(tiny_llama, wide_llama):
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp8_e5m2'"):
        LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=8, kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match=r"int4' needs block_size to be a multiple of 32.*block_size=16"):
        LLM(wide_llama, dtype="fp32", num_kv_blocks=8, kv_cache_dtype="int4", block_size=16)
    with pytest.raises(ValueError, match=r"head_dim \(16\) to be a multiple of group_size"):
        LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=8, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="cannot evict from an int4"):
        LLM(
            wide_llama,
            dtype="fp32",
            num_kv_blocks=8,
            kv_cache_dtype="int4",
            kv_policy="window",
            kv_policy_args={"window": 64},
        )
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=8, quantization="int3")


def test_int8_weights_generate(tiny_llama):
    ref = _run(tiny_llama[0], block_size=8)
    got = _run(tiny_llama[0], block_size=8, quantization="int8")
    identical, worst = _compare(ref, got)
    assert identical >= 0.5 and worst < 0.2, (identical, worst)


def test_prequantized_checkpoint_loads_through_load_model(tiny_llama, tmp_path):
    from longreach.model.loader import load_model
    from longreach.model.quant import Int8Linear, quantize_model, save_quantized

    out = save_quantized(quantize_model(load_model(tiny_llama[0], dtype="fp32"), "int8"), tmp_path / "q8")
    assert isinstance(load_model(out).model.layers[0].mlp.down_proj, Int8Linear)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = _prompts((20,))[0]
    swapped = LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=16, quantization="int8").generate(
        prompt, params, use_tqdm=False
    )
    saved = LLM(out, dtype="fp32", num_kv_blocks=16).generate(prompt, params, use_tqdm=False)
    assert saved[0].token_ids == swapped[0].token_ids
    with pytest.raises(ValueError, match="already quantized"):
        LLM(out, dtype="fp32", num_kv_blocks=16, quantization="int8")
