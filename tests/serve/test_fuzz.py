"""The server under generated input: schemathesis against the real `longreach serve` (benchmarks/fuzz_server.py,
small), and the inputs it found mishandled, pinned one by one; and the OpenAPI schema that drives it."""

import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from tests.serve.test_errors import is_openai_error
from tests.serve.test_load import _aborted

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_server.py"
C, CHAT = "/v1/completions", "/v1/chat/completions"


def load_script():
    spec = importlib.util.spec_from_file_location("fuzz_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schemathesis_finds_no_5xx_no_hang_and_leaves_nothing_held(byte_model_dir, tmp_path):
    pytest.importorskip("schemathesis")
    code = load_script().main(
        [
            "--model",
            str(byte_model_dir),
            "--max-examples",
            "20",
            "--max-model-len",
            "48",
            "--request-timeout",
            "30",
            "--out",
            str(tmp_path),
        ]
    )
    row = json.loads((tmp_path / "fuzz.json").read_text())
    assert row["num_5xx"] == 0 and row["no_answer"] == 0, row["statuses"]
    assert row["failures"] == [] and row["errors"] == [], (tmp_path / "schemathesis.log").read_text()[-4000:]
    assert (row["health_after"], row["kv_blocks_used_after"], row["exit_status"]) == (200, 0, 0)
    assert row["server_tracebacks"] == 0
    # the schema's streaming examples ran; schemathesis leaves a stream after 20 events, and the blocks came back
    assert row["streams_read_to_the_end"] + row["streams_left_by_the_client"] >= 2
    for op in ("POST /v1/completions", "POST /v1/chat/completions"):  # both accepted and refused bodies
        statuses = row["by_operation"][op]
        assert statuses.get("200", 0) >= 5 and statuses.get("400", 0) >= 5, (op, statuses)
    assert {"GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model_id}"} <= set(
        row["by_operation"]
    )
    assert code == 0


def test_openapi_documents_bodies_and_errors(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]
    for path, model in ((C, "CompletionRequest"), (CHAT, "ChatCompletionRequest")):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"
        }
        assert {"200", "400", "401", "404", "413", "503"} <= set(op["responses"])
        assert "text/event-stream" in op["responses"]["200"]["content"]
        assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert components["CompletionRequest"]["required"] == ["prompt"]
    assert components["ChatCompletionRequest"]["required"] == ["messages"]
    assert components["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    for path in ("/health", "/metrics", "/v1/models", "/v1/models/{model_id}"):
        assert "200" in schema["paths"][path]["get"]["responses"]
    assert "422" not in json.dumps(schema["paths"])  # we never answer FastAPI's 422 shape
    assert "securitySchemes" not in schema["components"]
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200


def test_openapi_names_the_bearer_key_when_one_is_set(byte_model_dir, one_thread):
    from tests.serve.conftest import make_engine, run_server

    with run_server(make_engine(byte_model_dir, num_kv_blocks=16), api_key="k") as keyed:
        schema = httpx.get(keyed.url + "/openapi.json", timeout=10).json()
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert schema["paths"][C]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_answers_match_the_documented_schemas(server):
    """The response models are documentation only: check real answers against them."""
    from longreach.serve import openapi as O

    client = httpx.Client(base_url=server.url, timeout=30)
    O.CompletionResponse.model_validate(
        client.post(C, json={"prompt": "hi", "max_tokens": 2, "n": 2, "logprobs": 2}).json()
    )
    O.ChatCompletionResponse.model_validate(
        client.post(
            CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True}
        ).json()
    )
    O.ModelList.model_validate(client.get("/v1/models").json())
    O.ModelCard.model_validate(client.get("/v1/models/tiny").json())
    O.Health.model_validate(client.get("/health").json())
    O.ErrorResponse.model_validate(client.post(C, json={"prompt": 5}).json())


SUR = "a\\ud800b"  # a lone surrogate: legal in a JSON string escape, not encodable as UTF-8

FOUND = {
    # what the fuzzer (or probing around its findings) turned up: (path, raw body, status, text in message)
    "integral float for an integer": (C, '{"prompt": "x", "max_tokens": 2.0, "n": 1e0}', 200, None),
    "fractional float for an integer": (C, '{"prompt": "x", "max_tokens": 2.5}', 400, "valid integer"),
    "lone surrogate in a chat role": (
        CHAT,
        f'{{"messages": [{{"role": "{SUR}", "content": "x"}}]}}',
        400,
        "unknown role a\\ud800b",
    ),
    "lone surrogate in a logit_bias key": (
        C,
        f'{{"prompt": "x", "logit_bias": {{"{SUR}": "q"}}}}',
        400,
        "logit_bias",
    ),
    "lone surrogate in an unknown model": (
        C,
        f'{{"prompt": "x", "model": "{SUR}"}}',
        404,
        "'a\\ud800b' does not exist",
    ),
    "a 5000-digit integer": (
        C,
        '{"prompt": "x", "n": ' + "9" * 5000 + "}",
        400,
        "a number has too many digits",
    ),
    "a batch's second prompt outside the vocabulary": (
        C,
        '{"prompt": [[1, 2], [3, 300]], "max_tokens": 50}',
        400,
        "prompt.1: token id 300 is outside the vocabulary",
    ),
    "too many stop strings": (
        C,
        json.dumps({"prompt": "x", "stop": [f"s{i}" for i in range(65)]}),
        400,
        "at most 64",
    ),
    "too many stop token ids": (
        C,
        json.dumps({"prompt": "x", "stop_token_ids": [1] * 1025}),
        400,
        "at most 1024",
    ),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_found_inputs_get_clear_answers_and_the_connection_survives(server, name):
    path, body, status, text = FOUND[name]
    aborted = _aborted(server)
    with httpx.Client(base_url=server.url, timeout=30) as client:  # one keep-alive connection for both
        r = client.post(
            path, content=body.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == status, r.text
        if status != 200:
            assert is_openai_error(r.json(), status) and text in r.json()["error"]["message"], r.text
        assert client.get("/health").json() == {"status": "ok"}
    server.wait_idle()
    assert _aborted(server) == aborted  # a refused request never reached the engine
