"""One property for the whole engine (hypothesis): whatever the schedule, every request that completes gets
exactly the greedy tokens of its solo run, and every KV block is free at the end.

Generated per example: the rope type (default, yarn, dynamic NTK, LongRoPE, Llama 3), prompts with shared
prefixes, arrival steps, max_tokens, the block size, a per-step token budget (chunked prefill), max_num_seqs,
a KV block count tight enough to force preemption, aborts at chosen steps, and at most one failure injected
inside the real runner's forward pass, after which the driver either keeps stepping (the step's requests were
requeued) or aborts everything in flight (what the server does). Tiny fp32 models, bounded examples,
derandomized so CI runs the same cases every time."""

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from longreach import LLM, SamplingParams
from longreach.model.loader import load_model
from tests.engine.test_failed_step import Boom, _fail_next_forward
from tests.engine.test_rope_schedule import _rope_model

ROPE_TYPES = ["default", "yarn", "dynamic", "longrope", "llama3"]
MAX_STEPS = 3000


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(rope):
        if rope not in cache:
            path, _ = _rope_model(rope, tmp_path_factory)
            cache[rope] = load_model(path, dtype="fp32")
        return cache[rope]

    return get


@pytest.fixture(scope="module")
def solo(models):
    runs = {}

    def run(rope, prompt, max_tokens):
        key = (rope, tuple(prompt), max_tokens)
        if key not in runs:
            llm = LLM(models(rope), enable_prefix_caching=False, num_kv_blocks=8, block_size=16)
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            runs[key] = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
        return runs[key]

    return run


requests_st = st.lists(
    st.tuples(
        st.integers(0, 2),  # which shared prefix: 0 none, 1 or 2
        st.integers(1, 36),  # own tokens after it
        st.integers(1, 8),  # max_tokens
        st.integers(0, 3),
    ),  # arrival step
    min_size=2,
    max_size=6,
)


@st.composite
def scenarios(draw):
    reqs = draw(requests_st)
    return dict(
        requests=reqs,
        seed=draw(st.integers(0, 2**16)),
        block_size=draw(st.sampled_from([4, 8])),
        budget=draw(st.sampled_from([3, 7, 16, 64])),
        max_num_seqs=draw(st.sampled_from([1, 2, 3, 4, 4])),
        spare_blocks=draw(st.sampled_from([0, 0, 1, 2, 4, 24])),
        aborts=draw(st.lists(st.tuples(st.integers(0, 12), st.integers(0, len(reqs) - 1)), max_size=2)),
        failure=draw(
            st.none()
            | st.tuples(st.integers(0, 4), st.sampled_from(["retry", "abort_all"]), st.integers(0, 1))
        ),
    )


def _make_prompts(sc):
    g = torch.Generator().manual_seed(sc["seed"])
    rand = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    prefixes = {0: [], 1: rand(24), 2: rand(13)}
    return [prefixes[p] + rand(n) for p, n, _, _ in sc["requests"]]


def _drive(engine, sc, prompts):
    """Run the scenario; returns {request index: token ids} of the requests that completed."""
    ids, done, aborted = {}, {}, set()
    engine.stats = {"num_cached_tokens": 0, "num_failures": 0}  # what this example exercised (events)
    step, undo = 0, None
    while step < MAX_STEPS:
        for i, (_, _, max_tokens, arrival) in enumerate(sc["requests"]):
            if arrival == step:
                params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
                ids[engine.add_request(prompts[i], params)] = i
        for at, i in sc["aborts"]:
            rid = next((r for r, j in ids.items() if j == i), None)
            if at == step and rid is not None and engine.abort(rid) is not None:
                aborted.add(i)
        if sc["failure"] is not None and sc["failure"][0] == step:
            undo = _fail_next_forward(engine, layer=sc["failure"][2])
        try:
            outputs = engine.step()
        except Boom:
            engine.stats["num_failures"] += 1
            if sc["failure"][1] == "abort_all":
                for rid in list(engine.requests):
                    engine.abort(rid)
                    aborted.add(ids[rid])
            outputs = []
        finally:
            if undo is not None:
                undo()
                undo = None
        for out in outputs:
            if out.finished:
                engine.stats["num_cached_tokens"] += out.metrics.num_cached_tokens
            if out.finished and out.finish_reason != "abort":
                done[ids[out.request_id]] = out.token_ids
        step += 1
        if step > max(a for *_, a in sc["requests"]) and not engine.has_unfinished_requests():
            return done, aborted
    raise AssertionError(f"the engine did not finish within {MAX_STEPS} steps")


@pytest.mark.parametrize("rope", ROPE_TYPES)
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sc=scenarios())
def test_every_completed_request_equals_its_solo_run(models, solo, rope, sc):
    sc = {**sc, "rope": rope}
    prompts = _make_prompts(sc)
    bs = sc["block_size"]
    longest = max(len(p) + m for p, (_, _, m, _) in zip(prompts, sc["requests"]))
    num_blocks = -(-longest // bs) + 1 + sc["spare_blocks"]  # one request always fits; several may not
    llm = LLM(
        models(sc["rope"]),
        block_size=bs,
        num_kv_blocks=num_blocks,
        max_num_seqs=sc["max_num_seqs"],
        max_num_batched_tokens=sc["budget"],
    )
    engine = llm.engine
    done, aborted = _drive(engine, sc, prompts)
    event("preempted" if engine.scheduler.num_preemptions else "no preemption")
    event("prefix hits" if engine.stats["num_cached_tokens"] else "no prefix hit")
    event("failed step" if engine.stats["num_failures"] else "no failure")
    for i, (prompt, (_, _, max_tokens, _)) in enumerate(zip(prompts, sc["requests"])):
        if i in aborted and i not in done:
            continue
        assert i in done, f"request {i} neither completed nor was aborted"
        assert done[i] == solo(sc["rope"], prompt, max_tokens), f"request {i} differs from its solo run"
    engine.kv_manager.check_invariants()
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    assert not engine.requests
