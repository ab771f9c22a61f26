"""Batch-invariant mode through the server: concurrent clients (streaming or not) get bitwise the tokens and
logprobs each prompt gets alone; `--batch-invariant` reaches the engine."""

import argparse
from concurrent.futures import ThreadPoolExecutor

import torch

from tests.serve.conftest import MAX_MODEL_LEN, run_server

PROMPTS = [
    "The pass key is 48213. Remember it. What is the pass key?",
    "a",
    "Long context " * 12,
    "The grass is green and the sky is blue; the sun is",
    "0123456789" * 5,
    "Why?",
]


def _engine(path):
    from longreach import LLM

    llm = LLM(
        path,
        dtype="bf16",
        device="cpu",
        max_model_len=MAX_MODEL_LEN,
        block_size=8,
        num_kv_blocks=256,
        max_num_batched_tokens=32,  # long prompts are chunked, and chunks share steps with decodes
        batch_invariant=True,
    )
    return llm.engine


def _ask(client, prompt, stream):
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    kwargs["extra_body"] = {"ignore_eos": True}
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs
    text, tokens, logprobs = "", [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
    return text, tokens, logprobs


def test_concurrent_clients_get_their_solo_answers_bitwise(byte_model_dir, one_thread):
    with run_server(_engine(byte_model_dir)) as server:
        assert server.engine.batch_invariant
        client = server.client()
        solo = [_ask(client, p, stream=False) for p in PROMPTS]
        jobs = [(p, i % 2 == 1) for i, p in enumerate(PROMPTS * 2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: _ask(server.client(), *job), jobs))
        server.wait_idle()
    assert all(len(s[2]) == 12 for s in solo)
    for (prompt, stream), got in zip(jobs, together):
        assert got == solo[PROMPTS.index(prompt)], f"{prompt!r} (stream={stream}) differs from its solo run"


def test_flag_reaches_the_engine(byte_model_dir):
    from longreach.serve.cli import add_arguments, build_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(byte_model_dir), "--batch-invariant", "--dtype", "bf16", "--device", "cpu"])
    engine = build_app(args)[0].state.server.engine
    assert engine.batch_invariant and next(engine.model.parameters()).dtype == torch.bfloat16
    args = parser.parse_args([str(byte_model_dir), "--dtype", "bf16", "--device", "cpu"])
    assert not build_app(args)[0].state.server.engine.batch_invariant
