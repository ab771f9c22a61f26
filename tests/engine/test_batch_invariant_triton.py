"""The batch-invariant attention's Triton kernel: under TRITON_INTERPRET=1 on CPU (small shapes) against the
PyTorch version and across chunkings and neighbours; on CUDA, the whole engine in bf16 (gpu-marked)."""

import os

import pytest
import torch

from longreach.attention.batch_invariant import SeqQueries, TilePlan, fixed_split_attention

triton_bi = pytest.importorskip("longreach.attention.triton_batch_invariant")
on_cpu = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's test"
)
BLOCK_SIZE, NUM_BLOCKS, LENGTH = 16, 12, 150


def _pages(num_kv_heads, head_dim, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    k, v = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    table = torch.randperm(NUM_BLOCKS, generator=g)[:10]
    pos = torch.arange(LENGTH)
    return k.to(device), v.to(device), (table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).to(device)


def _chunked(q, k, v, slots, chunks, window):
    out, start = [], 0
    for n in chunks:
        plan = TilePlan.build([SeqQueries(0, start, start + n, slots[: start + n])], n, q.device)
        out.append(triton_bi.fixed_split_attention_triton(q[start : start + n], k, v, plan, window))
        start += n
    return torch.cat(out)


@on_cpu
@pytest.mark.parametrize("num_heads", [4, 6], ids=["group2", "group3"])
@pytest.mark.parametrize("window", [(-1, -1), (20, 0)])
def test_kernel_matches_torch_and_every_chunking_bitwise(num_heads, window):
    k, v, slots = _pages(2, 16, torch.bfloat16)
    q = torch.randn(LENGTH, num_heads, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = _chunked(q, k, v, slots, [LENGTH], window)
    plan = TilePlan.build([SeqQueries(0, 0, LENGTH, slots)], LENGTH, q.device)
    read = lambda s: (k.flatten(0, 1)[s], v.flatten(0, 1)[s])  # noqa: E731
    torch.testing.assert_close(whole, fixed_split_attention(q, read, plan, window), rtol=1e-2, atol=1e-2)
    assert torch.equal(_chunked(q, k, v, slots, [7, 33, 1, 1, 64, 44], window), whole)
    seqs = [SeqQueries(0, 100, 101, slots[:101]), SeqQueries(1, 0, 50, slots[:50])]
    mixed = triton_bi.fixed_split_attention_triton(
        torch.cat([q[100:101], q[:50]]), k, v, TilePlan.build(seqs, 51, q.device), window
    )
    assert torch.equal(mixed[0], whole[100]) and torch.equal(mixed[1:], whole[:50])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_engine_on_cuda_gives_every_schedule_the_solo_bits(dtype):
    from longreach import LLM
    from tests.engine.test_batch_invariant import PARAMS, SCHEDULES, _prompts, tiny_model

    prompts = _prompts()

    def run(batch, **kwargs):
        kwargs = {"num_kv_blocks": 128, "block_size": 16, **kwargs}
        llm = LLM(tiny_model(dtype), device="cuda", batch_invariant=True, **kwargs)
        return [(o.token_ids, o.logprobs) for o in llm.generate(batch, PARAMS, use_tqdm=False)]

    solo = [run([p], enable_prefix_caching=False)[0] for p in prompts]
    for name, kwargs in SCHEDULES.items():
        assert run(prompts, **kwargs) == solo, name
