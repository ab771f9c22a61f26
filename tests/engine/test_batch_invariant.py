"""Batch-invariant mode: bitwise-equal token ids and logprobs alone, batched, chunked and preempted (bf16/fp16).

The mode-off test shows the difference it removes exists on the same prompts and schedules, so the mode-on
tests can fail."""

import pytest
import torch
import torch.nn.functional as F

from longreach import LLM, SamplingParams
from longreach.batch_invariant import (
    BATCH_INVARIANT_ENV,
    ROW_TILE,
    BatchInvariantLinear,
    resolve_batch_invariant,
    tiled_linear,
)
from longreach.config import ModelConfig, RopeConfig
from longreach.model.llama import LlamaForCausalLM

MAX_TOKENS = 10


def tiny_model(dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (4 query / 2 KV heads) with weights large enough that attention is sharp."""
    cfg = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope=RopeConfig(head_dim=16, max_position_embeddings=1024),
        max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.to(dtype)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (40,), generator=g).tolist()
    lengths = (37, 90, 5, 150, 64, 12)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    return prompts + [prefix + prompts[2], prefix + prompts[5]]  # two sharing a prefix (cache hits)


PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)


def _generate(dtype, batch_invariant, prompts, **kwargs):
    kwargs = {"num_kv_blocks": 128, "block_size": 16, **kwargs}
    llm = LLM(tiny_model(dtype), batch_invariant=batch_invariant, **kwargs)
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return [(o.token_ids, o.logprobs) for o in outs], llm.engine


def _solo(dtype, batch_invariant, prompts):
    return [_generate(dtype, batch_invariant, [p], enable_prefix_caching=False)[0][0] for p in prompts]


SCHEDULES = {
    "batched": dict(),
    "chunked-7": dict(max_num_batched_tokens=7),
    "chunked-40": dict(max_num_batched_tokens=40),
    "preempted": dict(num_kv_blocks=24, max_num_batched_tokens=64),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mode_on_gives_every_schedule_the_solo_tokens_and_logprobs(dtype):
    prompts = _prompts()
    solo = _solo(dtype, True, prompts)
    for name, kwargs in SCHEDULES.items():
        runs, engine = _generate(dtype, True, prompts, **kwargs)
        assert engine.batch_invariant
        if name == "preempted":
            assert engine.scheduler.num_preemptions > 0, "the small cache must force preemption"
        for i, (got, want) in enumerate(zip(runs, solo)):
            assert got[0] == want[0], f"{name}: prompt {i} tokens differ"
            assert got[1] == want[1], f"{name}: prompt {i} logprobs differ"


def test_mode_on_is_invariant_with_two_threads():
    """torch splits elementwise ops and reductions across threads at size-dependent points; two threads."""
    prompts = _prompts()[:3]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        solo = _solo(torch.bfloat16, True, prompts)
        runs, _ = _generate(torch.bfloat16, True, prompts, max_num_batched_tokens=23)
    finally:
        torch.set_num_threads(before)
    assert runs == solo


def test_mode_off_differs_on_the_same_schedules():
    """Without the mode the default paths (decode over padded groups, SDPA prefill, merged chunk calls)
    round differently: some logprob of the same prompt changes with the schedule."""
    prompts = _prompts()
    solo = _solo(torch.bfloat16, False, prompts)
    num_diff = 0
    for kwargs in SCHEDULES.values():
        runs, engine = _generate(torch.bfloat16, False, prompts, **kwargs)
        assert not engine.batch_invariant
        num_diff += sum(got != want for got, want in zip(runs, solo))
    assert num_diff > 0


def test_tiled_linear_rows_do_not_depend_on_the_number_of_rows():
    """Also in fp32, where this CPU's plain F.linear takes a different kernel for one row than for many."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        weight, bias = torch.randn(96, 80).to(dtype), torch.randn(96).to(dtype)
        x = torch.randn(70, 80).to(dtype)
        whole = tiled_linear(x, weight, bias)
        torch.testing.assert_close(whole, F.linear(x, weight, bias), rtol=2e-2, atol=2e-2)
        for start, num in [(0, 1), (3, 1), (5, 2), (9, ROW_TILE + 3), (30, 40)]:
            assert torch.equal(tiled_linear(x[start : start + num], weight, bias), whole[start : start + num])
        assert tiled_linear(x[None, :5], weight, bias).shape == (1, 5, 96)


def test_switch_env_and_errors(monkeypatch):
    monkeypatch.setenv(BATCH_INVARIANT_ENV, "1")
    assert resolve_batch_invariant(None) and not resolve_batch_invariant(False)
    monkeypatch.setenv(BATCH_INVARIANT_ENV, "maybe")
    with pytest.raises(ValueError, match="LONGREACH_BATCH_INVARIANT='maybe'"):
        resolve_batch_invariant(None)
    monkeypatch.delenv(BATCH_INVARIANT_ENV)
    model = tiny_model(torch.bfloat16)
    assert not LLM(model, num_kv_blocks=8).engine.batch_invariant
    monkeypatch.setenv(BATCH_INVARIANT_ENV, "1")
    assert LLM(model, num_kv_blocks=8).engine.batch_invariant
    assert isinstance(model.lm_head, BatchInvariantLinear)
    monkeypatch.delenv(BATCH_INVARIANT_ENV)
    assert LLM(model, num_kv_blocks=8).engine.batch_invariant  # an engine rebuilt over a switched model
    assert not LLM(model, num_kv_blocks=8, batch_invariant=False).engine.batch_invariant
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="token-local KV storage"):
        LLM(model, num_kv_blocks=8, kv_policy="window", kv_policy_args={"window": 32}, batch_invariant=True)
    with pytest.raises(ValueError, match="quantized linears"):
        LLM(tiny_model(torch.float32), quantization="int8", num_kv_blocks=8, batch_invariant=True)


def test_seeded_sampling_is_invariant_too():
    """Per-request seeds draw each request's noise from its own generator, so with invariant logits a sampled
    (temperature, top-p) request gets its solo tokens in any batch; unseeded ones share one stream."""
    prompts = _prompts()[:4]
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=i, logprobs=1) for i in range(4)]

    def run(batch, batch_params, **kwargs):
        llm = LLM(tiny_model(torch.bfloat16), batch_invariant=True, num_kv_blocks=64, **kwargs)
        return [(o.token_ids, o.logprobs) for o in llm.generate(batch, batch_params, use_tqdm=False)]

    solo = [run([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert run(prompts, params, max_num_batched_tokens=19) == solo
