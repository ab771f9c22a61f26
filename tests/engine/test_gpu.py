"""The engine on CUDA (Triton paged decode + KV write, Triton varlen prefill): greedy parity with transformers."""
import pytest
import torch

from longreach import LLM, SamplingParams
from tests.engine.test_parity import _hf_greedy, _prompts
from tests.model.conftest import make_hf_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", [dict(), dict(max_num_batched_tokens=16, block_size=4),
                                    dict(num_kv_blocks=28, block_size=8, max_num_batched_tokens=64)])
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
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1,
                                                   ignore_eos=True, logprobs=2), use_tqdm=False)
    assert all(len(o.token_ids) == 16 and len(o.logprobs) == 16 for o in outs)
