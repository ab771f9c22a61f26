"""Bad input gets the documented status and an OpenAI-shaped error, never a 500 or a hang, and the server
keeps answering. Bearer-key auth."""

import json

import httpx
import openai
import pytest

from tests.serve.conftest import MAX_MODEL_LEN, make_engine, run_server

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
MSG = [{"role": "user", "content": "hi"}]

CASES = {
    # name: (path, raw body bytes or a JSON-able body, status, text the message must contain, param)
    "malformed json": (C, b'{"model": "tiny", "prompt": ', 400, "not valid JSON", None),
    "invalid utf-8": (C, b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "not valid UTF-8", None),
    "not an object": (C, b"[1, 2, 3]", 400, "must be a JSON object", None),
    "NaN": (C, b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "not valid JSON", None),
    "deep nesting": (C, b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "", None),
    "missing prompt": (C, {"model": "tiny"}, 400, "prompt", "prompt"),
    "prompt wrong type": (C, {"model": "tiny", "prompt": 5}, 400, "prompt: must be a string", "prompt"),
    "max_tokens wrong type": (C, {**OK, "max_tokens": "ten"}, 400, "valid integer", "max_tokens"),
    "temperature as string": (C, {**OK, "temperature": "0.5"}, 400, "valid number", "temperature"),
    "empty prompt": (C, {**OK, "prompt": ""}, 400, "empty", "prompt"),
    "empty prompt list": (C, {**OK, "prompt": []}, 400, "empty", "prompt"),
    "n = 0": (C, {**OK, "n": 0}, 400, "greater than or equal to 1", "n"),
    "negative max_tokens": (C, {**OK, "max_tokens": -1}, 400, "greater than or equal to 0", "max_tokens"),
    "temperature < 0": (C, {**OK, "temperature": -0.5}, 400, "greater than or equal to 0", "temperature"),
    "top_p > 1": (C, {**OK, "top_p": 1.5}, 400, "less than or equal to 1", "top_p"),
    "penalty out of range": (
        C,
        {**OK, "presence_penalty": 3},
        400,
        "less than or equal to 2",
        "presence_penalty",
    ),
    "empty stop string": (C, {**OK, "stop": [""]}, 400, "must not be empty", "stop"),
    "min_tokens > max_tokens": (C, {**OK, "min_tokens": 5}, 400, "min_tokens=5 exceeds max_tokens=2", None),
    "token id outside vocab": (C, {**OK, "prompt": [1, 5000]}, 400, "outside the vocabulary", None),
    "lone surrogate": (C, b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, "cannot be tokenized", "prompt"),
    "stream_options without stream": (
        C,
        {**OK, "stream_options": {"include_usage": True}},
        400,
        "stream",
        None,
    ),
    "max_tokens 0 without echo": (C, {**OK, "max_tokens": 0}, 400, "only allowed with echo", "max_tokens"),
    "too long": (
        C,
        {**OK, "prompt": "x" * 250, "max_tokens": 10},
        400,
        f"maximum context length is {MAX_MODEL_LEN} tokens, but 260 were requested: 250 in the prompt + "
        "max_tokens=10",
        "max_tokens",
    ),
    "prompt alone too long": (
        C,
        {**OK, "prompt": [7] * 300, "max_tokens": 1},
        400,
        "300 in the prompt",
        None,
    ),
    "unknown model": (C, {**OK, "model": "gpt-9"}, 404, "'gpt-9' does not exist", "model"),
    "10 MB body": (C, {**OK, "prompt": "x" * 10_000_000}, 413, "limit", None),
    "chat: no messages": (CHAT, {"model": "tiny", "messages": []}, 400, "at least one message", "messages"),
    "chat: bad role": (
        CHAT,
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "unknown role wizard",
        "messages",
    ),
    "chat: message not an object": (CHAT, {"model": "tiny", "messages": ["hi"]}, 400, "", "messages.0"),
    "chat: image part": (
        CHAT,
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        400,
        "image_url",
        "messages",
    ),
    "chat: too long": (
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": "y" * 300}]},
        400,
        "maximum context length",
        "messages",
    ),
    "chat: tools": (
        CHAT,
        {"model": "tiny", "messages": MSG, "tools": [{"type": "function"}]},
        400,
        "tools",
        None,
    ),
    "chat: unknown model": (CHAT, {"model": "nope", "messages": MSG}, 404, "does not exist", "model"),
    "unknown route": ("/v1/embeddings", {"model": "tiny", "input": "x"}, 404, "no such endpoint", None),
}


def is_openai_error(body, status):
    err = body["error"]
    return (
        set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str)
        and err["message"]
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_table(server, name):
    path, body, status, text, param = CASES[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == status, r.text
    payload = r.json()
    assert is_openai_error(payload, status)
    assert text in payload["error"]["message"]
    if param is not None:
        assert payload["error"]["param"] == param
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_wrong_method_and_errors_through_the_client(server, byte_model_dir):
    r = httpx.get(server.url + C)
    assert r.status_code == 405 and is_openai_error(r.json(), 405)
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="z" * 200, max_tokens=100)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="z")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, n=0)
    # a request the engine's cache could never hold is refused up front, not left waiting forever
    with run_server(make_engine(byte_model_dir, num_kv_blocks=4)) as small:
        r = httpx.post(small.url + C, json={**OK, "prompt": "q" * 30, "max_tokens": 10})
        assert r.status_code == 400 and "holds 32" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def keyed(byte_model_dir, one_thread):
    with run_server(make_engine(byte_model_dir, num_kv_blocks=64), api_key="s3cret") as running:
        yield running


def test_api_key(keyed):
    url = keyed.url + C
    missing = httpx.post(url, json=OK)
    wrong = httpx.post(url, json=OK, headers={"Authorization": "Bearer nope"})
    not_bearer = httpx.post(url, json=OK, headers={"Authorization": "Basic s3cret"})
    for r in (missing, wrong, not_bearer):
        assert r.status_code == 401 and is_openai_error(r.json(), 401)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    out = keyed.client(api_key="s3cret").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert out.usage.completion_tokens == 1
    assert httpx.get(keyed.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(keyed.url + "/metrics").status_code == 200


EXTREME_BUT_VALID = [
    {"temperature": 1e308},
    {"temperature": 1e-300},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e300},
    {"top_k": 2**31 - 1},
    {"top_p": 1e-300},
    {"min_p": 1.0},
    {"presence_penalty": -2, "frequency_penalty": 2},
    {"seed": 2**64 - 1, "n": 3, "temperature": 1.0},
    {"seed": -(2**63)},
    {"logprobs": 20},
    {"min_tokens": 3, "stop_token_ids": [0, 258]},
    {"stop": ["a", "b", "c", "d", "e"]},
]


def test_extreme_but_valid_values_do_not_break_the_batch(server):
    """Odd sampling values run next to a normal request without failing the engine step they share."""
    import concurrent.futures

    client = server.client()
    normal = dict(
        model="tiny", prompt="steady", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = client.completions.create(**normal).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        steady = pool.submit(lambda: client.completions.create(**normal).choices[0].text)
        odd = [
            pool.submit(httpx.post, server.url + C, json={**OK, "max_tokens": 6, **extra}, timeout=30)
            for extra in EXTREME_BUT_VALID
        ]
        for extra, future in zip(EXTREME_BUT_VALID, odd):
            assert future.result().status_code == 200, (extra, future.result().text)
        assert steady.result() == expected
    too_big_float = b'{"model": "tiny", "prompt": "x", "temperature": 1e309}'
    for bad in (
        {"stop_token_ids": [259]},
        {"stop_token_ids": [-1]},
        too_big_float,
        {"prompt": ["a"] * 9, "n": 128},
        {"top_k": 2**40},
    ):
        content = bad if isinstance(bad, bytes) else json.dumps({**OK, **bad}).encode()
        r = httpx.post(server.url + C, content=content, timeout=30)
        assert r.status_code == 400 and is_openai_error(r.json(), 400), (bad, r.text)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
