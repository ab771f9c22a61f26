"""The server through the official `openai` client: completions and chat, streaming and not, n, seeds, stop
strings, logprobs, usage, /v1/models, /health and /metrics."""

import httpx
import pytest

from longreach.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
FIXED = {"ignore_eos": True}  # the random model may emit EOS at any step; these tests want exact lengths


def stream_text(chunks, n=1):
    texts = [""] * n
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    return texts


def test_models_and_health(server):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_completion_streamed_equals_non_streamed_and_usage(server, temperature):
    client = server.client()
    prompt = "The pass key is 7421. Remember it."
    kwargs = dict(
        model="tiny", prompt=prompt, max_tokens=20, temperature=temperature, seed=11, extra_body=FIXED
    )
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion" and full.model == "tiny" and full.id.startswith("cmpl-")
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(TOK.encode(prompt))
    assert full.usage.completion_tokens == 20 and full.usage.total_tokens == full.usage.prompt_tokens + 20
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert stream_text(chunks) == [full.choices[0].text]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    again = client.completions.create(**kwargs)  # seeded: reproducible
    assert again.choices[0].text == full.choices[0].text


def test_n_choices_batch_prompts_and_token_id_prompts(server):
    client = server.client()
    out = client.completions.create(
        model="tiny", prompt=["abc", "defgh"], n=2, max_tokens=5, temperature=1.0, seed=3, extra_body=FIXED
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 3 + 5 and out.usage.completion_tokens == 4 * 5
    assert out.choices[0].text != out.choices[1].text or out.choices[0].text == ""  # seed + i per choice
    streamed = list(
        client.completions.create(
            model="tiny",
            prompt=["abc", "defgh"],
            n=2,
            max_tokens=5,
            temperature=1.0,
            seed=3,
            extra_body=FIXED,
            stream=True,
        )
    )
    assert stream_text(streamed, 4) == [c.text for c in out.choices]
    by_ids = client.completions.create(
        model="tiny", prompt=TOK.encode("abc"), max_tokens=5, temperature=1.0, seed=3, extra_body=FIXED
    )
    assert by_ids.choices[0].text == out.choices[0].text and by_ids.usage.prompt_tokens == 3


def test_stop_strings_end_the_text_before_the_stop(server):
    client = server.client()
    base = (
        client.completions.create(
            model="tiny", prompt="stop here", max_tokens=24, temperature=0, extra_body=FIXED
        )
        .choices[0]
        .text
    )
    stop = next(base[i : i + 2] for i in range(3, len(base) - 2) if "\ufffd" not in base[i : i + 2])
    expected = base[: base.find(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model="tiny",
            prompt="stop here",
            max_tokens=24,
            temperature=0,
            stop=[stop],
            extra_body=FIXED,
            stream=stream,
        )
        if stream:
            chunks = list(out)
            text, reason = stream_text(chunks)[0], [c.choices[0].finish_reason for c in chunks][-1]
        else:
            text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert text == expected and reason == "stop"


def test_chat_streamed_equals_non_streamed(server):
    client = server.client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the pass key?"},
    ]
    kwargs = dict(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0.7,
        seed=5,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        extra_body=FIXED,
    )
    full = client.chat.completions.create(**kwargs)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 12
    prompt = TOK.apply_chat_template(messages, add_generation_prompt=True)
    assert full.usage.prompt_tokens == len(TOK.encode(prompt))
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    # content given as a list of text parts is the same message
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        messages[1],
    ]
    assert (
        client.chat.completions.create(**{**kwargs, "messages": parts}).choices[0].message.content
        == choice.message.content
    )


def test_chat_without_max_tokens_may_run_to_max_model_len(server):
    out = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, extra_body=FIXED
    )
    assert out.usage.total_tokens == server.engine.scheduler_config.max_model_len
    assert out.choices[0].finish_reason == "length"


def test_logprobs(server):
    client = server.client()
    out = client.completions.create(
        model="tiny", prompt="log", max_tokens=6, temperature=0, logprobs=3, extra_body=FIXED
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the top token was taken
        assert top.get(token, value) == pytest.approx(value, abs=1e-5)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=FIXED,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.bytes and len(c.bytes) == 1 for c in content)  # one byte per byte token
    streamed = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            extra_body=FIXED,
            stream=True,
        )
    )
    got = [
        t.logprob
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert got == pytest.approx([c.logprob for c in content])


def test_metrics_are_exposed(server):
    client = server.client()
    before = server.metric("longreach_generation_tokens_total")
    client.completions.create(model="tiny", prompt="count me", max_tokens=7, temperature=0, extra_body=FIXED)
    server.wait_idle()
    assert server.metric("longreach_generation_tokens_total") == before + 7
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "longreach_num_requests_running",
        "longreach_num_requests_waiting",
        "longreach_kv_cache_usage_percent",
        "longreach_prefix_cache_hit_rate",
        "longreach_num_preemptions_total",
        "longreach_time_to_first_token_seconds_bucket",
        "longreach_time_per_output_token_seconds_bucket",
        "longreach_prompt_tokens_total",
        "longreach_generation_tokens_total",
    ):
        assert name in text, name
    assert server.metric("longreach_time_to_first_token_seconds_count") >= 1
    assert server.metric("longreach_kv_cache_blocks_total") == server.engine.num_kv_blocks
    # the same long prompt twice: the second is served from the prefix cache
    prompt = "A shared prefix that spans several KV blocks of eight tokens each. " * 2
    hits = server.metric("longreach_prefix_cache_hits_total")
    for _ in range(2):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, extra_body=FIXED)
    server.wait_idle()
    assert server.metric("longreach_prefix_cache_hits_total") - hits >= 8 * (len(prompt) // 8 - 1)
    assert 0 < server.metric("longreach_prefix_cache_hit_rate") <= 1


def test_cache_salt_isolates_the_prefix_cache(server):
    """vLLM's `cache_salt`: requests share cached prefix blocks only when their salts match (a tenant's
    prompts cannot be probed by another's timing); the answer itself does not depend on the salt."""
    client = server.client()
    prompt = "a shared system prompt that spans several KV blocks of eight tokens, then the question"

    def hits_after(**extra):
        server.wait_idle()
        before = server.metric("longreach_prefix_cache_hits_total")
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, **extra)
        server.wait_idle()
        return server.metric("longreach_prefix_cache_hits_total") - before, out.choices[0].text

    first = hits_after(extra_body={"cache_salt": "tenant-a"})
    same = hits_after(extra_body={"cache_salt": "tenant-a"})
    other = hits_after(extra_body={"cache_salt": "tenant-b"})
    unsalted = hits_after()
    assert first[0] == 0 and same[0] >= 8 * 8 and other[0] == 0 and unsalted[0] == 0
    assert first[1] == same[1] == other[1] == unsalted[1]
    import httpx

    bad = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "cache_salt": ""})
    assert bad.status_code == 400 and "cache_salt" in bad.json()["error"]["message"]


def test_sampling_fields_reach_the_sampler(server):
    """top_k=1 or a tiny top_p leave only the most likely token: a hot temperature then samples the greedy text;
    different seeds without them differ."""
    client = server.client()
    base = dict(model="tiny", prompt="sampling fields", max_tokens=16, extra_body=FIXED)
    greedy = client.completions.create(**base, temperature=0).choices[0].text
    top_k = (
        client.completions.create(
            model="tiny",
            prompt="sampling fields",
            max_tokens=16,
            temperature=1.5,
            seed=1,
            extra_body={**FIXED, "top_k": 1},
        )
        .choices[0]
        .text
    )
    top_p = client.completions.create(**base, temperature=1.5, seed=2, top_p=1e-6).choices[0].text
    assert top_k == greedy and top_p == greedy
    hot = {client.completions.create(**base, temperature=1.5, seed=s).choices[0].text for s in (1, 2, 3)}
    assert len(hot) > 1
