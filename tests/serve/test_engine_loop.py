"""The engine thread: a failing engine step fails only the requests in flight (500, an error event) and the
server keeps serving; nothing waits forever on a stopped engine."""

import asyncio

import httpx
import pytest

from longreach.engine.sampling_params import SamplingParams
from longreach.serve.engine_loop import EngineLoop, ServerClosedError
from tests.serve.conftest import make_engine, run_server

BODY = {"model": "tiny", "prompt": "fail once", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def fragile(byte_model_dir, one_thread):
    with run_server(make_engine(byte_model_dir, num_kv_blocks=64)) as running:
        yield running


def test_a_failing_step_fails_the_batch_and_the_server_recovers(fragile):
    engine = fragile.engine
    real_step = engine.step
    calls = {"n": 0}

    def broken_step():
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    engine.step = broken_step
    try:
        r = httpx.post(fragile.url + "/v1/completions", json=BODY, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "simulated kernel failure" in r.json()["error"]["message"]
        with httpx.stream(
            "POST", fragile.url + "/v1/completions", json={**BODY, "stream": True}, timeout=30
        ) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"server_error"' in events[0] and events[-1] == "data: [DONE]"
        ok = httpx.post(fragile.url + "/v1/completions", json=BODY, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(fragile.url + "/health").json() == {"status": "ok"}
        fragile.wait_idle()
    finally:
        engine.step = real_step


def test_adds_after_stop_are_refused_not_left_waiting(byte_model_dir, one_thread):
    loop = EngineLoop(make_engine(byte_model_dir, num_kv_blocks=16))

    async def scenario():
        sink = asyncio.Queue()
        with pytest.raises(ServerClosedError, match="not running"):
            await loop.add([1, 2, 3], SamplingParams(max_tokens=2), "early", 0.0, sink)
        loop.start()
        await loop.add([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), "a", 0.0, sink)
        items = []
        while not items or not items[-1][1].finished:
            items.append(await asyncio.wait_for(sink.get(), 30))
        assert items[-1][1].finish_reason == "length" and items[-1][1].num_output_tokens == 2
        await asyncio.to_thread(loop.stop)
        with pytest.raises(ServerClosedError):
            await loop.add([1, 2, 3], SamplingParams(max_tokens=2), "late", 0.0, sink)
        loop._is_accepting = True  # even past the front door, a stopped thread answers
        with pytest.raises(ServerClosedError):
            await asyncio.wait_for(loop.add([1, 2, 3], SamplingParams(max_tokens=2), "later", 0.0, sink), 10)

    asyncio.run(scenario())
