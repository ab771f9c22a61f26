"""`LLM` / `LLMEngine` API: prompts as text or ids, streaming deltas, abort, metrics, errors, progress bar."""

import pytest
import torch

from longreach import LLM, SamplingParams
from longreach.config import CacheConfig, kv_cache_memory_fields
from longreach.model.bundled import BUNDLED_MODEL_DIR


def test_text_prompts_outputs_and_metrics(byte_llama, capsys):
    llm = LLM(byte_llama[0], dtype=torch.float32)
    tok = llm.get_tokenizer()
    prompts = ["Hello there", "The grass is green. " * 6]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    assert "Processed prompts" in capsys.readouterr().err  # the progress bar
    for prompt, out in zip(prompts, outs):
        assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt)
        assert out.outputs[0].text == out.text == tok.decode(out.token_ids)
        assert out.finished and out.finish_reason in ("stop", "length")
        m = out.metrics
        assert m.ttft > 0 and m.num_generated_tokens == len(out.token_ids)
        assert m.decode_tokens_per_s is None or m.decode_tokens_per_s > 0
    one = llm.generate("Hello there", SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert one[0].token_ids == outs[0].token_ids  # a single prompt works too


def test_engine_streams_and_aborts(byte_llama):
    llm = LLM(byte_llama[0], dtype="fp32", block_size=4)
    engine = llm.engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    keep = engine.add_request("stream me", params, request_id="keep")
    drop = engine.add_request("drop me " * 5, params, request_id="drop")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("again", params, request_id="keep")
    pieces, ids, steps = [], [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == keep:
                pieces.append(out.delta_text)
                ids += out.delta_token_ids
                final = out
        steps += 1
        if steps == 3:
            aborted = engine.abort(drop)
            assert aborted.finish_reason == "abort" and engine.abort(drop) is None
    assert "".join(pieces) == final.text and ids == final.token_ids and len(ids) == 12
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks
    engine.kv_manager.check_invariants()


def test_bad_input_is_rejected_with_the_numbers(tiny_llama):
    llm = LLM(tiny_llama[0], dtype="fp32", max_model_len=64, num_kv_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="prompt has 64 tokens but max_model_len is 64"):
        llm.generate([[5] * 64], use_tqdm=False)
    with pytest.raises(ValueError, match=r"needs up to 40 tokens.*holds 32"):
        llm.generate([[5] * 30], SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(ValueError, match=r"token id 500 is outside the vocabulary \[0, 128\)"):
        llm.generate([[5, 500]], use_tqdm=False)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        llm.generate(["no tokenizer here"], use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings"):
        llm.generate([[5, 6]], SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate([[5, 6]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing half-added is left behind
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=29, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 29  # exactly the cache's 32 slots


def test_cache_sizing(tiny_llama):
    # 2 layers x 2 KV heads x head_dim 16 x fp32 x (K and V) = 512 bytes per token
    llm = LLM(tiny_llama[0], dtype="fp32", block_size=16, kv_cache_memory=512 * 16 * 10 + 100)
    assert llm.engine.num_kv_blocks == 10
    llm = LLM(tiny_llama[0], dtype="bf16", block_size=16, memory_fraction=0.5, max_num_seqs=3)
    assert llm.engine.num_kv_blocks == 3 * 512 // 16  # capped at what 3 full sequences use
    assert llm.generate([[4, 5, 6]], SamplingParams(max_tokens=3), use_tqdm=False)[0].token_ids
    with pytest.raises(ValueError, match="kv_cache_memory=100 bytes is less than one KV block"):
        LLM(tiny_llama[0], kv_cache_memory=100)


def test_kv_cache_memory_as_a_fraction_and_dtype_second(tiny_llama):
    """kv_cache_memory takes bytes or a fraction of the free memory; dtype is LLM's second argument."""
    llm = LLM(tiny_llama[0], "bf16", block_size=16, kv_cache_memory=0.5, max_num_seqs=3)
    assert next(llm.engine.model.parameters()).dtype == torch.bfloat16
    cc = llm.engine.cache_config
    assert (cc.memory_fraction, cc.kv_cache_memory) == (0.5, None)
    assert llm.engine.num_kv_blocks == 3 * 512 // 16  # as with memory_fraction=0.5
    assert kv_cache_memory_fields(4e6) == (4_000_000, None)  # a float count of bytes
    assert kv_cache_memory_fields(0.25) == (None, 0.25)
    for bad, needle in [(0.0, "0.0"), (-2, "-2"), (1.5, "1.5"), (True, "True")]:
        with pytest.raises(ValueError, match=f"kv_cache_memory={needle}"):
            kv_cache_memory_fields(bad)
    with pytest.raises(ValueError, match="kv_cache_memory=0.5 must be a positive number of bytes"):
        CacheConfig(kv_cache_memory=0.5)  # the config holds bytes only
    with pytest.raises(ValueError, match="give one"):
        LLM(tiny_llama[0], kv_cache_memory=0.3, memory_fraction=0.4)
    with pytest.raises(TypeError):
        LLM(tiny_llama[0], "fp32", "a-tokenizer")  # tokenizer is keyword-only


@pytest.mark.skipif((BUNDLED_MODEL_DIR / "config.json").is_file(), reason="the bundled demo model exists")
def test_no_model_without_bundled_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="bundled demo model"):
        LLM()


@pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "config.json").is_file(), reason="no bundled demo model in this build"
)
def test_no_model_loads_the_bundled_demo_model():
    llm = LLM(max_num_seqs=2, max_model_len=256)
    out = llm.generate("The sky is", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert len(out.token_ids) <= 4 and out.text == llm.get_tokenizer().decode(out.token_ids)


def test_rope_scaling_overrides_the_checkpoint(tiny_llama):
    """LLM(rope_scaling=) loads the model as load_model(rope_scaling=) does, and generates what that model does."""
    from longreach.model.generate import generate
    from longreach.model.loader import load_model

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    llm = LLM(tiny_llama[0], "fp32", rope_scaling=rope, max_model_len=128)
    assert llm.engine.model.config.rope.rope_type == "yarn"
    prompt = [(7 * i) % 125 + 3 for i in range(70)]  # past the original 32 positions
    got = llm.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    scaled = load_model(tiny_llama[0], dtype="fp32", rope_scaling=rope)
    assert got.token_ids == generate(scaled, [prompt], 8)[0]
    with torch.no_grad():  # the override changed the model
        assert not torch.allclose(
            scaled(torch.tensor(prompt)),
            load_model(tiny_llama[0], dtype="fp32")(torch.tensor(prompt)),
            atol=1e-3,
        )
    with pytest.raises(ValueError, match="already built"):
        LLM(llm.engine.model, rope_scaling=rope)
