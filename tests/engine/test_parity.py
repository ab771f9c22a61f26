"""Greedy outputs of the engine are token-identical to transformers' greedy `generate` (fp32, tiny random
checkpoints) under every scheduling regime: plain continuous batching, prefix caching on and off, chunked
prefill forced small, and memory pressure that forces preemption by recompute."""

import pytest
import torch

from longreach import LLM, SamplingParams
from tests.model.conftest import make_hf_model

MAX_NEW = 24


def _prompts(vocab=128):
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731  (ids 0-2 are special)
    shared = rand(40)
    prompts = [rand(n) for n in (5, 17, 33, 64, 150)]
    prompts += [shared + rand(n) for n in (3, 20, 1)]  # a shared prefix: prefix-cache hits
    prompts.append(prompts[3][:])  # an exact duplicate
    return prompts


def _hf_greedy(model, prompts, max_new=MAX_NEW):
    out, device = [], next(model.parameters()).device
    for p in prompts:
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
            )
        out.append(gen[0, len(p) :].tolist())
    return out


@pytest.fixture(scope="module")
def reference(tiny_llama):
    prompts = _prompts()
    return prompts, _hf_greedy(tiny_llama[1], prompts)


CONFIGS = {
    "default": dict(),
    "no_prefix_caching": dict(enable_prefix_caching=False),
    "chunked_prefill_16": dict(max_num_batched_tokens=16, block_size=4),
    "preemption": dict(num_kv_blocks=28, block_size=8, max_num_batched_tokens=64),
    "two_seqs_at_a_time": dict(max_num_seqs=2, block_size=1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_matches_transformers(tiny_llama, reference, config):
    prompts, expected = reference
    llm = LLM(tiny_llama[0], dtype="fp32", **CONFIGS[config])
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)
    for i, (out, ref) in enumerate(zip(outs, expected)):
        assert out.token_ids == ref, f"prompt {i} (length {len(prompts[i])}) diverged under {config}"
        assert out.finish_reason == ("stop" if len(ref) < MAX_NEW else "length")
    engine = llm.engine
    engine.kv_manager.check_invariants()
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "blocks leaked"
    hits = [o.metrics.num_cached_tokens for o in outs]
    if config == "no_prefix_caching":
        assert not any(hits)
    else:
        assert hits[5] == 0 and hits[6] >= 32 and hits[7] >= 32, hits
        assert hits[8] > 0 or config == "preemption", hits  # under pressure the first copy may be evicted
    if config == "preemption":
        assert engine.scheduler.num_preemptions > 0
        assert sum(o.metrics.num_preemptions for o in outs) == engine.scheduler.num_preemptions


def test_second_pass_hits_the_prefix_cache_and_agrees(tiny_llama, reference):
    prompts, expected = reference
    llm = LLM(tiny_llama[0], dtype="fp32", block_size=4)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in again] == expected
    for prompt, out in zip(prompts, again):
        assert out.metrics.num_cached_tokens == (len(prompt) - 1) // 4 * 4


def test_sliding_window_model_matches_transformers(tmp_path):
    """Mistral with a 16-token window: windowed decode and windowed chunked prefill over pages."""
    model = make_hf_model("mistral", sliding_window=16, max_position_embeddings=512)
    model.save_pretrained(tmp_path)
    prompts = _prompts()[:5]
    expected = _hf_greedy(model, prompts)
    llm = LLM(tmp_path, dtype="fp32", block_size=4, max_num_batched_tokens=24)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
