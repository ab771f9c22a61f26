"""The engine on CUDA (Triton paged decode + KV write, Triton varlen prefill): greedy parity with transformers."""

import pytest

from longreach import LLM, SamplingParams
from tests.engine.test_parity import _hf_greedy, _prompts
from tests.model.conftest import make_hf_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(max_num_batched_tokens=16, block_size=4),
        dict(num_kv_blocks=28, block_size=8, max_num_batched_tokens=64),
    ],
)
def test_cuda_greedy_matches_transformers(tmp_path, config):
    model = make_hf_model("llama", max_position_embeddings=512)
    model.save_pretrained(tmp_path)
    prompts = _prompts()
    expected = _hf_greedy(model.cuda(), prompts, max_new=24)
    llm = LLM(tmp_path, dtype="fp32", device="cuda", **config)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_cuda_bf16_sampling_runs(tmp_path):
    model = make_hf_model("mistral", sliding_window=16, max_position_embeddings=512)
    model.save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype="bf16", device="cuda", block_size=16, memory_fraction=0.05)
    outs = llm.generate(
        _prompts(),
        SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True, logprobs=2),
        use_tqdm=False,
    )
    assert all(len(o.token_ids) == 16 and len(o.logprobs) == 16 for o in outs)


@pytest.mark.parametrize(
    "config",
    [
        dict(kv_cache_dtype="int8"),
        dict(kv_cache_dtype="int4"),
        dict(kv_cache_dtype="int8", kv_policy="window", kv_policy_args={"window": 64}),
        dict(kv_policy="h2o", kv_policy_args={"heavy": 32, "recent": 32}),
        dict(quantization="int8"),
    ],
)
def test_cuda_quantized_kv_policies_and_weights_run(tmp_path, config):
    """int8 decode dequantizes inside the Triton kernel; int4 and policies gather."""
    model = make_hf_model(
        "llama",
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
    )
    model.save_pretrained(tmp_path)
    prompts = [[t % 127 + 1 for t in range(199)], list(range(5, 40))]
    llm = LLM(tmp_path, dtype="bf16", device="cuda", max_num_batched_tokens=64, num_kv_blocks=128, **config)
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert all(len(o.token_ids) == 200 for o in outs)
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_cuda_int8_kv_decode_matches_cpu(tmp_path):
    """int8 KV: the Triton decode dequantizing in the kernel gives the CPU path's greedy tokens (fp32 model)."""
    model = make_hf_model("llama", max_position_embeddings=512)
    model.save_pretrained(tmp_path)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    tokens = {}
    for device in ("cpu", "cuda"):
        llm = LLM(
            tmp_path, dtype="fp32", device=device, block_size=16, num_kv_blocks=128, kv_cache_dtype="int8"
        )
        tokens[device] = [o.token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
    assert tokens["cuda"] == tokens["cpu"]
