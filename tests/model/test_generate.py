"""Contiguous-cache generation against transformers' greedy generate."""

import pytest
import torch

from longreach import load_model
from longreach.model.generate import generate, sample_next


def test_greedy_matches_transformers_for_a_mixed_batch(hf_checkpoint):
    path, theirs = hf_checkpoint(
        "llama",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        max_position_embeddings=128,
    )
    ours = load_model(path, dtype="fp32")
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 23, 40)]
    got = generate(ours, prompts, max_tokens=12)
    for prompt, out in zip(prompts, got):
        expected = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out == expected


def test_sliding_window_generation_matches(hf_checkpoint):
    path, theirs = hf_checkpoint("mistral", sliding_window=8)
    ours = load_model(path, dtype="fp32")
    prompt = torch.randint(0, 128, (14,)).tolist()
    expected = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, 14:].tolist()
    assert generate(ours, [prompt], max_tokens=10) == [expected]


def test_stops_at_stop_token_and_seeded_sampling_repeats(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    ours = load_model(path, dtype="fp32")
    prompt = [[1, 2, 3]]
    greedy = generate(ours, prompt, max_tokens=8)[0]
    assert generate(ours, prompt, max_tokens=8, stop_token_ids=(greedy[2],))[0] == greedy[:3]
    a = generate(ours, prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = generate(ours, prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) <= {0, 1}
    probs = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]).softmax(0)  # 0.64, 0.24, ...: top_p 0.7 keeps two
    assert probs[0] < 0.7 < probs[:2].sum()
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=gen).tolist()) == {0, 1}


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens=0"):
        generate(None, [[1]], max_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(None, [[]], max_tokens=3)
