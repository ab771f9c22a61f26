"""/v1/completions' `echo` (what log-likelihood scorers such as lm-eval send): the prompt before the completion,
with `logprobs` the prompt tokens' logprobs first (the first null), equal to transformers' fp32 log-softmax;
`max_tokens: 0` answers the prompt alone; streamed too."""

import json

import httpx
import pytest
import torch

C = "/v1/completions"
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_logprobs(byte_model_dir):
    """ids -> (len(ids) - 1, V) transformers' fp32 logprobs of each next token."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(byte_model_dir, dtype=torch.float32).eval()

    def run(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)[:-1]

    return run


def _texts(server, ids):
    return [server.engine.tokenizer.decode([t], skip_special_tokens=False) for t in ids]


def test_echo_max_tokens_0_with_the_openai_client(server, hf_logprobs):
    prompt = "The pass key is 7421."
    out = server.client().completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = out.choices[0]
    ids = server.engine.tokenizer.encode(prompt)
    rows = hf_logprobs(ids)
    assert choice.text == prompt and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == _texts(server, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p, token in enumerate(ids[1:]):
        assert abs(lp.token_logprobs[p + 1] - rows[p, token].item()) <= TOL
        ((top_text, top_value),) = lp.top_logprobs[p + 1].items()
        assert abs(top_value - rows[p].max().item()) <= TOL
        assert top_text == _texts(server, [rows[p].argmax().item()])[0]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]


def test_echo_with_a_completion_puts_the_prompt_first(server):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    plain = httpx.post(server.url + C, json=body, timeout=30).json()["choices"][0]
    echoed = httpx.post(server.url + C, json={**body, "echo": True}, timeout=30).json()["choices"][0]
    assert echoed["text"] == "abc" + plain["text"]
    assert echoed["finish_reason"] == plain["finish_reason"]
    n = len(plain["logprobs"]["tokens"])
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert echoed["logprobs"][key][-n:] == plain["logprobs"][key]
    assert (
        echoed["logprobs"]["tokens"][:3] == ["a", "b", "c"]
        and echoed["logprobs"]["token_logprobs"][0] is None
    )


def test_echo_without_logprobs_and_batched_token_ids(server):
    body = {"model": "tiny", "prompt": [[104, 105], [111, 107, 33]], "n": 2, "max_tokens": 0, "echo": True}
    out = httpx.post(server.url + C, json=body, timeout=30).json()
    assert [c["text"] for c in out["choices"]] == ["hi", "hi", "ok!", "ok!"]
    assert all(c["logprobs"] is None for c in out["choices"])
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}


def test_echo_streamed(server):
    body = {"model": "tiny", "prompt": "xyz", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    plain = httpx.post(server.url + C, json=body, timeout=30).json()["choices"][0]
    with httpx.stream("POST", server.url + C, json={**body, "echo": True, "stream": True}, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == "xyz" + plain["text"]
    first = chunks[0]["logprobs"]
    assert first["tokens"][:3] == ["x", "y", "z"] and first["token_logprobs"][0] is None
    streamed = [v for c in chunks for v in c["logprobs"]["token_logprobs"]]
    assert streamed[3:] == plain["logprobs"]["token_logprobs"]


def test_echo_streamed_max_tokens_0(server):
    body = {"model": "tiny", "prompt": "q", "max_tokens": 0, "echo": True, "stream": True}
    with httpx.stream("POST", server.url + C, json=body, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [(c["text"], c["finish_reason"]) for c in chunks] == [("q", "length")]
