"""SamplingParams(prompt_logprobs=k): transformers' fp32 log-softmax of every prompt token given its prefix,
whatever the schedule (alone, batched, chunked, after a prefix-cache warm-up, preempted)."""

import pytest
import torch

from longreach import LLM, SamplingParams

TOL = 1e-4


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) transformers' logprob of ids[p + 1] given ids[: p + 1], and the full (P - 1, V) rows."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)[:-1]


def _llm(path, **kwargs) -> LLM:
    kwargs = {"block_size": 8, "num_kv_blocks": 64, **kwargs}
    return LLM(path, dtype="fp32", device="cpu", **kwargs)


def _check(entries, ids, rows, k):
    assert len(entries) == len(ids) and entries[0] is None
    for p, entry in enumerate(entries[1:]):
        token = ids[p + 1]
        assert abs(entry[token] - rows[p, token].item()) <= TOL
        top_values, top_ids = rows[p].topk(k)
        assert set(entry) == set(top_ids.tolist()) | {token}
        for t, v in zip(top_ids.tolist(), top_values.tolist()):
            assert abs(entry[t] - v) <= TOL


def test_prompt_logprobs_match_transformers(tiny_llama):
    path, model = tiny_llama
    ids = _prompt(0, 40)
    out = _llm(path).generate([ids], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3))[0]
    _check(out.prompt_logprobs, ids, _reference(model, ids), 3)
    assert len(out.token_ids) == 3


def test_prompt_logprobs_zero_gives_the_prompt_tokens_only(tiny_llama):
    path, model = tiny_llama
    ids = _prompt(1, 12)
    out = _llm(path).generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    _check(out.prompt_logprobs, ids, _reference(model, ids), 0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])


def test_requests_without_prompt_logprobs_get_none(tiny_llama):
    out = _llm(tiny_llama[0]).generate([_prompt(2, 9)], SamplingParams(max_tokens=2))[0]
    assert out.prompt_logprobs is None


@pytest.mark.parametrize(
    "setting",
    [
        dict(),  # one step per prompt
        dict(max_num_batched_tokens=7),  # chunked prefill: 7 tokens a step, shared with the neighbours
        dict(num_kv_blocks=14, max_num_batched_tokens=64),  # too few blocks for all: preemptions
    ],
    ids=["batched", "chunked", "preempted"],
)
def test_prompt_logprobs_under_any_schedule(tiny_llama, setting):
    """The request of interest runs beside others and after the same prompt warmed the prefix cache (a hit
    would skip positions whose logprobs are needed): every entry still equals transformers'."""
    path, model = tiny_llama
    llm = _llm(path, **setting)
    ids = _prompt(3, 37)
    llm.generate([ids], SamplingParams(max_tokens=1))  # the prefix cache now holds its full blocks
    others = [_prompt(10 + i, n) for i, n in enumerate((5, 29, 18))]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, prompt_logprobs=2)] * 2
    params += [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * 2
    outs = llm.generate([others[0], ids, others[1], others[2]], params, use_tqdm=False)
    _check(outs[1].prompt_logprobs, ids, _reference(model, ids), 2)
    _check(outs[0].prompt_logprobs, others[0], _reference(model, others[0]), 2)
    assert outs[1].metrics.num_cached_tokens == 0
    if "num_kv_blocks" in setting:
        assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_prompt_logprobs_out_of_range_is_named():
    with pytest.raises(ValueError, match="prompt_logprobs=-1"):
        SamplingParams(prompt_logprobs=-1)
