"""The server after a real engine failure: the exception is raised inside the model's forward pass (after
layer 0 wrote its K/V, before layer 1 did), not by replacing `engine.step`. The requests in flight get a
500, the server keeps serving, and a later request sharing their prompt's prefix gets exactly the text it
gets from a fresh server: no block of the failed step is a prefix-cache hit."""

import httpx

from tests.engine.test_failed_step import Boom, _fail_next_forward
from tests.serve.conftest import make_engine, run_server

PREFIX = "The grass is green and the sky is blue. " * 3
BODY = {"model": "tiny", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _complete(url, prompt):
    return httpx.post(url + "/v1/completions", json={**BODY, "prompt": prompt}, timeout=60)


def test_a_failure_inside_the_forward_pass_poisons_nothing(byte_model_dir, one_thread):
    with run_server(make_engine(byte_model_dir)) as fresh:
        expected = _complete(fresh.url, PREFIX + "Again?").json()["choices"][0]["text"]
    with run_server(make_engine(byte_model_dir)) as running:
        undo = _fail_next_forward(running.engine)
        try:
            r = _complete(running.url, PREFIX + "First?")
        finally:
            undo()
        assert r.status_code == 500 and Boom.__name__ in r.json()["error"]["message"]
        running.wait_idle()
        again = _complete(running.url, PREFIX + "Again?")
        assert again.status_code == 200
        assert again.json()["choices"][0]["text"] == expected
        assert httpx.get(running.url + "/health").json() == {"status": "ok"}
        running.wait_idle()
        running.engine.kv_manager.check_invariants()
