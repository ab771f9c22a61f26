"""Nothing is lost under load: clients that disconnect get their requests aborted and KV blocks freed; a burst
of concurrent streaming clients over a KV cache small enough to force preemption all complete, each with
the text it gets when run alone."""

import asyncio
import random
import statistics
import time

import httpx
import openai
import pytest

from tests.serve.conftest import make_engine, run_server

FIXED = {"ignore_eos": True}


@pytest.fixture(scope="module")
def tight(byte_model_dir, one_thread):
    """48 blocks of 8 tokens: 384 token slots shared by every request (a burst cannot all fit)."""
    engine = make_engine(
        byte_model_dir,
        max_model_len=256,
        num_kv_blocks=48,
        block_size=8,
        max_num_seqs=64,
        max_num_batched_tokens=256,
    )
    with run_server(engine) as running:
        yield running


@pytest.fixture(scope="module")
def roomy(byte_model_dir, one_thread):
    """Long requests (up to 2048 tokens) that are still running when their clients leave."""
    with run_server(
        make_engine(byte_model_dir, max_model_len=2048, num_kv_blocks=512, block_size=16)
    ) as running:
        yield running


def test_disconnect_mid_stream_aborts_and_frees_blocks(roomy):
    aborted = _aborted(roomy)
    body = {
        "model": "tiny",
        "prompt": "a prompt of a few blocks " * 4,
        "max_tokens": 1900,
        "stream": True,
        "temperature": 0,
        **FIXED,
    }
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", roomy.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            data = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(3))]
            assert len(data) == 3
            assert roomy.metric("longreach_kv_cache_blocks_used") > 0
        # leaving the block closes the connection mid-stream
    roomy.wait_idle()
    assert _aborted(roomy) == aborted + 1
    roomy.engine.kv_manager.pool.check_invariants()


def test_disconnect_while_waiting_for_a_non_streamed_answer(roomy):
    aborted = _aborted(roomy)
    body = {"model": "tiny", "prompt": "patience", "max_tokens": 2000, "temperature": 0, **FIXED}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(roomy.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    roomy.wait_idle()
    assert _aborted(roomy) == aborted + 1


def _aborted(server):
    try:
        return server.metric("longreach_request_success_total", '{finished_reason="abort"}')
    except KeyError:
        return 0.0


async def _burst(url, jobs, num_leavers):
    """Run every job concurrently as a streaming completion; the first `num_leavers` leave after 2 chunks.
    Returns (texts, finish reasons, client-side TTFTs, seconds)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i, job):
        start = time.perf_counter()
        stream = await client.completions.create(model="tiny", stream=True, extra_body=FIXED, **job)
        text, reason, ttft, num_chunks = "", None, None, 0
        async for chunk in stream:
            num_chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - start
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
            if i < num_leavers and num_chunks == 2:
                await stream.close()
                return text, "left", ttft
        return text, reason, ttft

    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    finally:
        await client.close()
    elapsed = time.perf_counter() - start
    texts, reasons, ttfts = map(list, zip(*results))
    return texts, reasons, ttfts, elapsed


def test_burst_with_preemption_and_leavers_loses_nothing(tight):
    rng = random.Random(0)
    words = "the grass is green the sky is blue the sun is yellow here we go there and back again".split()
    jobs = []
    for i in range(64):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 24)))
        job = {"prompt": prompt, "max_tokens": rng.randint(8, 32)}
        job.update({"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i})
        if i < 6:  # leavers: long enough to still be running
            job["max_tokens"] = 256 - len(prompt) - 1
        jobs.append(job)
    preemptions = tight.metric("longreach_num_preemptions_total")
    texts, reasons, ttfts, elapsed = asyncio.run(_burst(tight.url, jobs, num_leavers=6))
    assert reasons[:6] == ["left"] * 6
    assert reasons[6:] == ["length"] * 58
    assert tight.metric("longreach_num_preemptions_total") > preemptions, "the cache should have run out"
    tight.wait_idle()
    tight.engine.kv_manager.pool.check_invariants()
    # the same requests one at a time give the same text
    client = tight.client()
    for job, text in list(zip(jobs, texts))[6:]:
        alone = client.completions.create(model="tiny", extra_body=FIXED, **job).choices[0].text
        assert alone == text, job
    ttfts.sort()
    print(
        f"\nburst: {len(jobs)} streaming requests in {elapsed:.2f} s ({len(jobs) / elapsed:.1f} req/s), "
        f"TTFT p50 {statistics.median(ttfts) * 1e3:.0f} ms, p99 {ttfts[int(0.99 * (len(ttfts) - 1))] * 1e3:.0f} ms"
    )
