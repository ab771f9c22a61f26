"""vLLM's /tokenize, /detokenize and /version: shapes, agreement with what the completion endpoints count,
round trips, the schema, and bad input as a 400 naming the field."""

import httpx
import pytest

import longreach

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=30)


def test_tokenize_counts_what_a_completion_counts(server):
    prompt = "The pass key is 7421. Ünïcode too."
    out = _post(server, "/tokenize", {"model": "tiny", "prompt": prompt}).json()
    assert out["tokens"] == server.engine.tokenizer.encode(prompt)
    assert (
        out["count"] == len(out["tokens"])
        and out["max_model_len"] == server.engine.scheduler_config.max_model_len
    )
    usage = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == out["count"]


def test_tokenize_messages_as_the_chat_endpoint(server):
    out = _post(server, "/tokenize", {"messages": MSG}).json()
    text = server.engine.tokenizer.apply_chat_template(MSG, add_generation_prompt=True)
    assert out["tokens"] == server.engine.tokenizer.encode(text, add_bos=False)
    usage = _post(server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == out["count"]
    bare = _post(server, "/tokenize", {"messages": MSG, "add_generation_prompt": False}).json()
    no_prompt = server.engine.tokenizer.apply_chat_template(MSG, add_generation_prompt=False)
    assert bare["tokens"] == server.engine.tokenizer.encode(no_prompt, add_bos=False) != out["tokens"]


def test_detokenize_round_trip(server):
    text = "round trip: 日本語 and emoji 🦙"
    tokens = _post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    assert _post(server, "/detokenize", {"model": "tiny", "tokens": tokens}).json() == {"prompt": text}
    assert _post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


def test_version(server):
    r = httpx.get(server.url + "/version", timeout=30)
    assert r.status_code == 200 and r.json() == {"version": longreach.__version__}


def test_schema_documents_the_routes(server):
    paths = httpx.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/tokenize", "/detokenize", "/version"} <= set(paths)
    body = paths["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/TokenizeRequest"}


@pytest.mark.parametrize(
    "path, body, status, text, param",
    [
        ("/tokenize", {}, 400, "exactly one of 'prompt' and 'messages'", "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MSG}, 400, "exactly one", "prompt"),
        ("/tokenize", {"prompt": 5}, 400, "valid string", "prompt"),
        ("/tokenize", {"messages": []}, 400, "at least one message", "messages"),
        ("/tokenize", {"prompt": "a", "model": "gpt-9"}, 404, "'gpt-9' does not exist", "model"),
        ("/detokenize", {"tokens": [1, 5000]}, 400, "token id 5000 is outside the vocabulary", "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "valid list", "tokens"),
        ("/detokenize", {}, 400, "'tokens' is a required property", "tokens"),
    ],
)
def test_bad_input(server, path, body, status, text, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error["message"] and error["param"] == param


def test_api_key_guards_tokenize_not_version(byte_model_dir):
    from tests.serve.conftest import make_engine, run_server

    with run_server(make_engine(byte_model_dir), api_key="s3cret") as keyed:
        assert _post(keyed, "/tokenize", {"prompt": "a"}).status_code == 401
        assert _post(keyed, "/detokenize", {"tokens": [97]}).status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        r = httpx.post(keyed.url + "/tokenize", json={"prompt": "a"}, headers=headers, timeout=30)
        assert r.json()["tokens"] == [97]
        assert httpx.get(keyed.url + "/version", timeout=30).status_code == 200
        schema = httpx.get(keyed.url + "/openapi.json", timeout=30).json()["paths"]
        assert schema["/tokenize"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in schema["/version"]["get"]
