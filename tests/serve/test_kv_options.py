"""`longreach serve --kv-cache-dtype int8 --kv-policy window:W --quantization int8`: the flags reach the engine,
requests complete, and /metrics reports the KV bytes held."""

import argparse

import pytest

from longreach.serve.cli import CLIError, add_arguments, build_app
from tests.serve.conftest import run_server


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        [
            *argv,
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--num-kv-blocks",
            "64",
            "--max-model-len",
            "256",
            "--block-size",
            "8",
        ]
    )


def test_int8_kv_window_policy_and_int8_weights_serve(byte_model_dir, one_thread):
    app, _ = build_app(
        _args(
            str(byte_model_dir),
            "--kv-cache-dtype",
            "int8",
            "--kv-policy",
            "window:32",
            "--quantization",
            "int8",
            "--served-model-name",
            "tiny",
        )
    )
    engine = app.state.server.engine
    assert engine.cache.quantizer.name == "int8" and engine.policy.window == 32
    with run_server(engine) as server:
        out = server.client().completions.create(
            model="tiny",
            prompt="The grass is green. " * 3,
            max_tokens=60,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.usage.completion_tokens == 60
        server.wait_idle()
        assert server.metric("longreach_kv_cache_bytes_used") == 0
        assert server.metric("longreach_kv_cache_bytes_total") == 64 * engine.cache.block_bytes
        # int8 pages with fp16 scales: 2 layers x 8 tokens x 2 heads x (16 + 2) bytes x K and V
        assert engine.cache.block_bytes == 2 * 8 * 2 * 18 * 2


def test_bad_kv_policy_is_a_one_line_error(byte_model_dir):
    with pytest.raises(CLIError, match="--kv-policy: unknown KV eviction policy 'lru'"):
        build_app(_args(str(byte_model_dir), "--kv-policy", "lru:8"))
    with pytest.raises(CLIError, match="'many' is not a token budget"):
        build_app(_args(str(byte_model_dir), "--kv-policy", "window:many"))
