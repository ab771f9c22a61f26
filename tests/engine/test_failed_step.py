"""A step whose forward pass fails (out of memory, Ctrl-C, a kernel error) must not poison the prefix cache:
blocks it registered are forgotten, its requests start over from their tokens, and later requests with the
same prefix get exactly the tokens they get alone. The failure is injected inside the real runner's forward
pass (after layer 0 wrote its K/V, before layer 1 did), not by replacing `step`."""

import pytest
import torch

from longreach import LLM, SamplingParams
from longreach.engine.sequence import RequestStatus

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


class Boom(RuntimeError):
    pass


def _fail_next_forward(engine, num_failures=1, layer=0):
    """Make the next `num_failures` forward passes raise inside layer `layer`'s MLP, after its attention
    wrote this step's K/V for that layer only. Returns the undo function."""
    mlp = engine.model.model.layers[layer].mlp
    real = mlp.forward
    left = {"n": num_failures}

    def forward(x):
        if left["n"] > 0:
            left["n"] -= 1
            raise Boom("injected failure inside the forward pass")
        return real(x)

    mlp.forward = forward
    return lambda: setattr(mlp, "forward", real)


def _prompts():
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 128, (40,), generator=g).tolist()
    return prefix, [prefix + torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9)]


def _solo(path, prompt):
    llm = LLM(path, dtype="fp32", enable_prefix_caching=False, block_size=4)
    return llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids


def test_failed_step_leaves_no_poisoned_prefix(tiny_llama):
    prefix, (first, second) = _prompts()
    llm = LLM(tiny_llama[0], dtype="fp32", block_size=4)
    engine = llm.engine
    undo = _fail_next_forward(engine)
    with pytest.raises(Boom):
        llm.generate([first], GREEDY, use_tqdm=False)  # LLM aborts its requests and re-raises
    undo()
    engine.kv_manager.check_invariants()
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks
    assert not engine.kv_manager.pool.cached, "blocks of the failed step are still registered as prefix hits"
    out = llm.generate([second], GREEDY, use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens == 0
    assert out.token_ids == _solo(tiny_llama[0], second)
    again = llm.generate([first], GREEDY, use_tqdm=False)[0]  # a succeeded step's blocks do hit
    assert again.metrics.num_cached_tokens >= len(prefix)
    assert again.token_ids == _solo(tiny_llama[0], first)


def test_requests_of_a_failed_step_are_requeued_and_a_retry_is_exact(tiny_llama):
    """Two requests sharing a prefix in one step (the second hits the first's blocks, registered in the same
    step): the step fails, both go back to the queue with nothing lost, and stepping again gives each exactly
    its solo tokens. Requests not in the failed step are untouched."""
    prefix, (first, second) = _prompts()
    llm = LLM(tiny_llama[0], dtype="fp32", block_size=4, max_num_seqs=2)
    engine = llm.engine
    a = engine.add_request(first, GREEDY)
    b = engine.add_request(second, GREEDY)
    c = engine.add_request(first[:7], GREEDY)  # waits: max_num_seqs=2
    undo = _fail_next_forward(engine)
    with pytest.raises(Boom):
        engine.step()
    undo()
    seqs = [engine.requests[r] for r in (a, b, c)]
    assert [s.status for s in seqs] == [RequestStatus.WAITING] * 3
    assert [s.num_computed_tokens for s in seqs] == [0, 0, 0]
    assert [s.request_id for s in engine.scheduler.waiting] == [a, b, c]  # arrival order kept
    assert not engine.kv_manager.pool.cached and engine.kv_manager.num_free_blocks == engine.num_kv_blocks
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert done[a] == _solo(tiny_llama[0], first)
    assert done[b] == _solo(tiny_llama[0], second)
    assert done[c] == _solo(tiny_llama[0], first[:7])
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks


def test_a_decode_step_failure_keeps_generated_tokens(tiny_llama):
    """A failure after some tokens were generated: the request recomputes prompt + outputs and goes on."""
    _, (first, _) = _prompts()
    llm = LLM(tiny_llama[0], dtype="fp32", block_size=4)
    engine = llm.engine
    r = engine.add_request(first, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.requests[r].num_output_tokens == 3
    undo = _fail_next_forward(engine, layer=1)
    with pytest.raises(Boom):
        engine.step()
    undo()
    assert engine.requests[r].num_output_tokens == 3 and engine.requests[r].num_computed_tokens == 0
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    assert out.token_ids == _solo(tiny_llama[0], first)
