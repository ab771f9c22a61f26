"""Sampler: masks, penalties, seeded reproducibility, stops and logprobs (units, then through the engine)."""

import math

import pytest
import torch

from longreach import LLM, SamplingParams
from longreach.engine.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p
from longreach.engine.sequence import Sequence

NEG = float("-inf")


def seq(params, prompt=(1, 2, 3), outputs=()):
    s = Sequence("r", list(prompt), params)
    for t in outputs:
        s.append_token(t)
    return s


def test_top_k_top_p_masks():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]] * 3)
    logits = probs.log()
    out = apply_top_k_top_p(logits, torch.tensor([2, 4, 1]), None)
    assert torch.isinf(out[0]).tolist() == [True, False, True, False]
    assert not torch.isinf(out[1]).any()
    assert torch.isinf(out[2]).tolist() == [True, False, True, True]
    out = apply_top_k_top_p(logits, None, torch.tensor([0.7, 0.45, 1.0]))
    assert torch.isinf(out[0]).tolist() == [True, False, True, False]  # 0.5 + 0.3 reaches 0.7
    assert torch.isinf(out[1]).tolist() == [True, False, True, True]  # the top token alone reaches 0.45
    assert not torch.isinf(out[2]).any()
    assert torch.equal(out[~torch.isinf(out)], logits[~torch.isinf(out)])  # kept logits are unchanged


def test_min_p_mask():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    out = apply_min_p(logits, torch.tensor([0.2]))  # threshold 0.2 * 0.5 = 0.1
    assert torch.isinf(out[0]).tolist() == [True, False, False, False]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    apply_penalties(logits, [seq(SamplingParams(repetition_penalty=2.0), prompt=(0, 1))])
    assert logits.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]  # HF rule, prompt tokens included
    logits = torch.zeros(1, 5)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties(logits, [seq(params, prompt=(4,), outputs=(2, 2, 3))])
    assert logits.tolist() == [[0.0, 0.0, -1.25, -0.75, 0.0]]  # prompt token 4 untouched (OpenAI)


def test_greedy_top_k_one_and_seeded_sampling():
    sampler = Sampler(seed=0)
    logits = torch.randn(
        4, 50, generator=torch.Generator().manual_seed(0)
    )  # seeded: the asserts below are fixed
    greedy = [seq(SamplingParams(temperature=0)), seq(SamplingParams(top_k=1, temperature=5.0))]
    assert sampler(logits[:2], greedy).token_ids == logits[:2].argmax(-1).tolist()
    draws = lambda s: [
        Sampler(seed=None)(logits[2:3], [seq(SamplingParams(seed=s))]).token_ids[0]  # noqa: E731
        for _ in range(10)
    ]
    assert draws(7) == draws(7)
    assert len({draws(s)[0] for s in range(8)}) > 1  # different seeds, different draws
    # top-k / top-p restrict the support: 300 draws never leave it
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.3), SamplingParams(min_p=0.5)]
    row = logits[3]
    for p in params:
        support = set()
        for _ in range(100):
            support.add(sampler(row[None], [seq(p)]).token_ids[0])
        if p.top_k:
            assert support <= set(row.topk(3).indices.tolist())
        else:
            masked = (
                apply_top_k_top_p(row[None], None, torch.tensor([0.3]))
                if p.top_p < 1
                else apply_min_p(row[None], torch.tensor([0.5]))
            )
            assert support <= set(torch.nonzero(~torch.isinf(masked[0])).flatten().tolist())


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = Sampler(seed=1)
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sampler(probs.log()[None], [seq(SamplingParams())]).token_ids[0]] += 1
    assert torch.allclose(counts / 2000, probs, atol=0.04)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    sampler = Sampler(eos_token_ids=[0])
    assert sampler(
        logits, [seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]))]
    ).token_ids == [2]
    assert sampler(logits, [seq(SamplingParams(temperature=0, min_tokens=1), outputs=(2,))]).token_ids == [0]


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="min_tokens=5 exceeds max_tokens=2"):
        SamplingParams(min_tokens=5, max_tokens=2)
    assert SamplingParams(top_k=-1).top_k is None and SamplingParams(stop="x").stop == ("x",)


# ---------------------------------------------------------------- through the engine


def test_seeded_requests_reproduce_in_any_batch(tiny_llama):
    llm = LLM(tiny_llama[0], dtype="fp32")
    prompt = list(range(3, 40))
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=123)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    others = [list(range(50, 60)), list(range(7, 90))]
    batched = llm.generate(
        others + [prompt], [SamplingParams(max_tokens=12, temperature=1.0)] * 2 + [params], use_tqdm=False
    )[2].token_ids
    assert alone == batched
    other_seed = llm.generate(
        [prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=124), use_tqdm=False
    )[0].token_ids
    assert other_seed != alone


def test_logprobs_match_transformers(tiny_llama):
    path, hf = tiny_llama
    prompt = list(range(3, 30))
    out = LLM(path, dtype="fp32").generate(
        [prompt], SamplingParams(max_tokens=5, temperature=0, logprobs=3), use_tqdm=False
    )[0]
    ids = torch.tensor([prompt])
    gen = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert len(out.logprobs) == len(out.token_ids) == 5
    for token, entry, logits in zip(out.token_ids, out.logprobs, gen.logits):
        ref = logits[0].float().log_softmax(-1)
        assert token in entry and len(entry) == 3  # greedy: the sampled token is the top-1
        top = ref.topk(3)
        assert sorted(entry) == sorted(top.indices.tolist())
        for t, lp in entry.items():
            assert math.isclose(lp, ref[t].item(), abs_tol=1e-4)


def test_stop_token_ids_and_max_tokens(tiny_llama):
    llm = LLM(tiny_llama[0], dtype="fp32")
    prompt = list(range(3, 20))
    free = llm.generate(
        [prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = llm.generate(
        [prompt],
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_stop_strings(byte_llama):
    llm = LLM(byte_llama[0], dtype="fp32")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    free = llm.generate(["The pass key is"], params, use_tqdm=False)[0]
    assert free.text == llm.get_tokenizer().decode(free.token_ids)
    stop = free.text[10:13]
    cut = free.text.index(stop)
    for include in (False, True):
        p = SamplingParams(
            max_tokens=40,
            temperature=0,
            ignore_eos=True,
            stop=[stop, "\x00never"],
            include_stop_str_in_output=include,
        )
        out = llm.generate(["The pass key is"], p, use_tqdm=False)[0]
        assert out.text == free.text[: cut + (len(stop) if include else 0)]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert len(out.token_ids) < 40
