"""The vLLM-named serve flags reach the engine and the request path: --gpu-memory-utilization (CPU mapping),
--[no-]enable-chunked-prefill, --chat-template, --generation-config (defaults for omitted fields only)."""

import argparse
import json

import httpx
import pytest

from longreach.serve import protocol as P
from longreach.serve.generation_config import apply_generation_defaults, load_generation_defaults
from longreach.serve.startup import gpu_kv_budget
from tests.serve.conftest import run_server

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"


def _args(*argv):
    from longreach.serve.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*argv, "--dtype", "fp32", "--device", "cpu"])


def _generation_dir(tmp_path, **values):
    directory = tmp_path / "gen"
    directory.mkdir(exist_ok=True)
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True, **values}))
    return directory


def test_new_flags_reach_the_engine_and_the_server(byte_model_dir, tmp_path):
    from longreach.serve.cli import build_app

    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    gen = _generation_dir(tmp_path, temperature=0.25, top_k=7, max_new_tokens=5)
    args = _args(
        str(byte_model_dir),
        "--gpu-memory-utilization",
        "0.125",
        "--no-enable-chunked-prefill",
        "--max-model-len",
        "256",
        "--max-num-batched-tokens",
        "256",
        "--chat-template",
        str(tmp_path / "chat.jinja"),
        "--generation-config",
        str(gen),
    )
    app, _ = build_app(args)
    engine = app.state.server.engine
    assert engine.scheduler_config.enable_chunked_prefill is False
    assert engine.cache_config.memory_fraction == 0.125  # on a CPU: the KV cache's share of free memory
    assert engine.tokenizer.chat_template == TEMPLATE
    assert engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<bot>"
    state = app.state.server
    assert state.generation_defaults == {"temperature": 0.25, "top_k": 7, "max_tokens": None}
    assert state.max_tokens_fallback == 5 and state.max_tokens_cap == 5  # a DIR's max_new_tokens also caps
    assert app.state.generation_config == gen / "generation_config.json"


def test_chunked_prefill_is_on_by_default_and_vllm_means_no_defaults(byte_model_dir, tmp_path):
    from longreach.serve.cli import build_app

    app, _ = build_app(_args(str(byte_model_dir), "--num-kv-blocks", "16", "--generation-config", "vllm"))
    assert app.state.server.engine.scheduler_config.enable_chunked_prefill is True
    assert app.state.server.generation_defaults == {} and app.state.generation_config is None


def test_generation_config_choices(tmp_path):
    assert load_generation_defaults("vllm", tmp_path) == ({}, None)
    assert load_generation_defaults("auto", tmp_path) == ({}, None)  # a checkpoint without the file
    gen = _generation_dir(tmp_path, temperature=0.6, top_p=0.9, repetition_penalty=1.1, eos_token_id=2)
    assert load_generation_defaults("auto", gen) == (
        {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1},
        gen / "generation_config.json",
    )
    bad = _generation_dir(tmp_path, temperature=-1)
    with pytest.raises(ValueError, match="temperature"):
        load_generation_defaults(str(bad), None)


def test_defaults_fill_only_what_a_request_omits():
    defaults = {"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 7}
    omitted = P.CompletionRequest.model_validate({"prompt": "x"})
    filled = apply_generation_defaults(omitted, defaults)
    assert (filled.temperature, filled.top_k, filled.repetition_penalty, filled.max_tokens) == (
        0.6,
        20,
        1.1,
        7,
    )
    given = P.CompletionRequest.model_validate({"prompt": "x", "temperature": 1.0, "max_tokens": 16})
    kept = apply_generation_defaults(given, defaults)
    assert (kept.temperature, kept.max_tokens, kept.top_k) == (1.0, 16, 20)  # even when equal to our default
    chat = P.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3}
    )
    assert apply_generation_defaults(chat, defaults).max_tokens is None  # max_completion_tokens was given


def test_generation_defaults_reach_requests_through_the_server(byte_model_dir, one_thread):
    from tests.serve.conftest import make_engine

    with run_server(make_engine(byte_model_dir)) as server:
        state = server.app.state.server

        def tokens(route, body):
            answer = httpx.post(server.url + route, json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()

        state.generation_defaults, state.max_tokens_fallback = {"temperature": 0.0, "max_tokens": None}, 5
        body = {"model": "tiny", "prompt": "The grass is", "ignore_eos": True}
        first, second = tokens("/v1/completions", body), tokens("/v1/completions", body)
        assert first["usage"]["completion_tokens"] == 5  # max_new_tokens instead of OpenAI's 16
        assert first["choices"][0]["text"] == second["choices"][0]["text"]  # temperature 0: greedy
        assert tokens("/v1/completions", {**body, "max_tokens": 9})["usage"]["completion_tokens"] == 9
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        assert (
            tokens("/v1/chat/completions", chat)["usage"]["completion_tokens"] == 5
        )  # not the whole context
        state.max_tokens_fallback = 1000  # more than the context leaves: the answer is shortened, not refused
        long_prompt = tokens("/v1/completions", {**body, "prompt": "x" * 200})["usage"]
        assert long_prompt["prompt_tokens"] + long_prompt["completion_tokens"] == 256  # max_model_len
        state.max_tokens_cap = 4  # --generation-config DIR: a request's own max_tokens is capped too
        assert tokens("/v1/completions", {**body, "max_tokens": 9})["usage"]["completion_tokens"] == 4


def test_llm_api_refuses_kv_cache_memory_1_as_the_cli_does():
    from longreach.config import kv_cache_memory_fields

    with pytest.raises(ValueError, match="kv_cache_memory=1 would be one byte: pass 1.0"):
        kv_cache_memory_fields(1)
    assert kv_cache_memory_fields(1.0) == (None, 1.0) and kv_cache_memory_fields(2**30) == (2**30, None)


def test_gpu_kv_budget_is_what_the_fraction_leaves():
    gib = 2**30
    assert gpu_kv_budget(0.9, 80 * gib, 16 * gib, 2 * gib) == int(0.9 * 80 * gib) - 18 * gib
    with pytest.raises(ValueError, match="--gpu-memory-utilization 0.2: 20% of 80.00 GiB leaves nothing"):
        gpu_kv_budget(0.2, 80 * gib, 16 * gib, 2 * gib)


def test_gpu_memory_utilization_rebuilds_the_cache_from_measured_memory(byte_model_dir, monkeypatch):
    """The CUDA path's plumbing on CPU, with the device's memory figures faked: a step is measured, the
    engine is rebuilt with the budget the fraction leaves."""
    import torch

    from longreach import LLM
    from longreach.serve.startup import resize_for_gpu_utilization

    mib = 2**20
    fake = {
        "synchronize": lambda device=None: None,
        "memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "max_memory_allocated": lambda device=None: 1 * mib,  # the step's activations
        "empty_cache": lambda: None,
        "mem_get_info": lambda device=None: (56 * mib, 64 * mib),  # 8 MiB in use without the cache
    }
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)
    llm = LLM(byte_model_dir, dtype="fp32", device="cpu", max_model_len=256, num_kv_blocks=20, block_size=16)
    resize_for_gpu_utilization(llm, 0.5, seed=0)
    budget = 32 * mib - 8 * mib - 1 * mib
    engine = llm.engine
    assert engine.cache_config.kv_cache_memory == budget and engine.cache_config.num_blocks is None
    assert engine.num_kv_blocks == budget // engine.plan.block_bytes
    [out] = llm.generate(["hello"], use_tqdm=False)
    assert out.finished
