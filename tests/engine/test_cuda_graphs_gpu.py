"""CUDA-graph decode on a GPU: replayed graphs give the eager engine's tokens, token for token, at batch 1, 8
and 64 (padded buckets included), in fp32 and bf16. Step times are benchmarks/decode_graphs.py's business."""

import pytest

from longreach import LLM, SamplingParams
from tests.model.conftest import make_hf_model

pytestmark = pytest.mark.gpu


def _prompts(num: int) -> list[list[int]]:
    return [[(13 * i + 7 * j) % 120 + 1 for j in range(5 + (37 * i) % 90)] for i in range(num)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("num_requests", [1, 8, 64])
def test_graph_replay_gives_the_eager_tokens(tmp_path, dtype, num_requests):
    model = make_hf_model("llama", max_position_embeddings=512)
    model.save_pretrained(tmp_path)
    params = [
        SamplingParams(max_tokens=8 + i % 13, temperature=0, ignore_eos=True) for i in range(num_requests)
    ]
    prompts = _prompts(num_requests)
    kwargs = dict(dtype=dtype, device="cuda", block_size=16, memory_fraction=0.05, max_model_len=512)
    eager = LLM(tmp_path, enforce_eager=True, **kwargs)
    assert eager.engine.runner.graphs is None
    expected = [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    graphed = LLM(tmp_path, **kwargs)
    graphs = graphed.engine.runner.graphs
    assert graphs is not None
    got = [o.token_ids for o in graphed.generate(prompts, params, use_tqdm=False)]
    assert graphs.disabled is None and graphs.graphs  # captured and replayed, not fallen back
    assert got == expected
