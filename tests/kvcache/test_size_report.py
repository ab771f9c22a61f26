"""The KV size / cost calculator and the `longreach kv-size` verb."""

from __future__ import annotations

import json

import pytest

from longreach.cli import main as cli_main
from longreach.config import ModelConfig
from longreach.kvcache.presets import PRESETS, resolve_model
from longreach.kvcache.size_report import parse_length
from longreach.kvcache.spec import (
    GiB,
    KiB,
    kv_bytes_per_request,
    kv_bytes_per_request_without_gqa,
    kv_bytes_per_token,
    num_params,
    prefill_cost,
    prefill_flops,
)

N_128K = 131_072


def _config(**overrides) -> ModelConfig:
    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "vocab_size": 100,
    }
    return ModelConfig.from_hf_dict(config | overrides)


def _row(text: str, dtype: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.split()[:1] == [dtype]]
    assert len(lines) == 1, text
    return lines[0].split()


def test_llama_70b_figures():
    arch = resolve_model("Llama-3.1-70B").config
    assert kv_bytes_per_token(arch, "bf16") == (320 * KiB, 0)
    data, scales = kv_bytes_per_request(arch, N_128K, "bf16")
    assert (data / GiB, scales) == (40.0, 0)
    data, scales = kv_bytes_per_request(arch, N_128K, "int8")
    assert data / GiB == 20.0
    assert scales == 2 * 80 * 8 * 2 * N_128K  # fp16 scale per (token, KV head), K and V
    assert kv_bytes_per_request_without_gqa(arch, N_128K, "bf16") == (320 * GiB, 0)
    data, scales = kv_bytes_per_request(arch, N_128K, "int4")
    assert data / GiB == 10.0 and scales / GiB == 2.5  # 4 bytes per group of 32 values
    assert kv_bytes_per_token(arch, "fp8") == (160 * KiB, 2 * 80 * 8 * 2)  # + int8's scales


def test_params_and_flops():
    assert round(num_params(resolve_model("Llama-3.1-8B").config) / 1e9, 2) == 8.03
    assert round(num_params(resolve_model("Llama-3.1-70B").config) / 1e9, 1) == 70.6
    assert round(num_params(resolve_model("Llama-3.1-405B").config) / 1e9) == 406
    arch = _config()
    flops = prefill_flops(arch, 10)
    assert flops["dense"] == 2 * num_params(arch, include_embeddings=False) * 10
    assert flops["lm_head"] == 2 * 32 * 100 * 10
    assert flops["attention"] == 4 * 2 * 4 * 8 * 10**2 / 2
    assert flops["total"] == flops["dense"] + flops["lm_head"] + flops["attention"]
    seconds, dollars = prefill_cost(989e12 * 0.4 * 3600, peak_tflops=989, mfu=0.4, gpu_price_per_hour=3.0)
    assert (seconds, dollars) == pytest.approx((3600, 3.0))


def test_cli_table(capsys):
    assert cli_main(["kv-size", "Llama-3.1-70B", "--context", "128k"]) == 0
    out = capsys.readouterr().out
    assert "131,072 tokens" in out
    bf16 = _row(out, "bf16")
    assert bf16[1:2] == ["320.0"] and "40.0" in bf16 and bf16[-1] == "320.0"
    int8 = _row(out, "int8")
    assert "20.0" in int8 and "2,560" in int8 and "0.31" in int8
    assert "GPU-seconds" in out and "$" in out


def test_cli_json_dtype_and_batch(capsys):
    assert (
        cli_main(
            [
                "kv-size",
                "meta-llama/Llama-3.1-70B",
                "--context",
                "131072",
                "--dtype",
                "int8",
                "--batch",
                "4",
                "--json",
                "--gpu-price-per-hour",
                "2",
                "--mfu",
                "0.5",
                "--peak-tflops",
                "1000",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert [row["dtype"] for row in rep["kv"]] == ["int8"]
    row = rep["kv"][0]
    assert row["data_bytes_per_request"] == 20 * GiB
    assert row["total_bytes_batch"] == 4 * row["total_bytes_per_request"]
    prefill = rep["prefill"]
    assert prefill["gpu_seconds_per_request"] == pytest.approx(prefill["flops_per_request"]["total"] / 5e14)
    assert prefill["dollars_batch"] == pytest.approx(4 * prefill["gpu_seconds_per_request"] * 2 / 3600)


@pytest.mark.parametrize(
    "name, preset",
    [
        ("Llama-3.1-70B", "meta-llama/Llama-3.1-70B"),
        ("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B"),
        ("meta-llama/llama-3.1-70b-instruct", "meta-llama/Llama-3.1-70B"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
        ("LLAMA-3.1-405B", "meta-llama/Llama-3.1-405B"),
        ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1"),
        ("Mistral-7B", "mistralai/Mistral-7B-v0.1"),
        ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B"),
        ("qwen2.5-72b-instruct", "Qwen/Qwen2.5-72B"),
    ],
)
def test_name_resolution(name, preset):
    assert resolve_model(name) is PRESETS[preset]
    assert resolve_model(name).name == preset


def test_preset_numbers():
    qwen = PRESETS["Qwen/Qwen2.5-7B"].config
    shapes = (
        qwen.num_hidden_layers,
        qwen.num_attention_heads,
        qwen.num_key_value_heads,
        qwen.head_dim,
        qwen.hidden_size,
        qwen.intermediate_size,
        qwen.vocab_size,
    )
    assert shapes == (28, 28, 4, 128, 3584, 18944, 152064)
    assert kv_bytes_per_token(qwen, "bf16")[0] == 56 * KiB
    assert kv_bytes_per_token(PRESETS["meta-llama/Llama-3.1-8B"].config, "bf16")[0] == 128 * KiB
    # presets are real ModelConfigs, built by the one config.json parser: Llama 3.1's rope is there too
    llama = PRESETS["meta-llama/Llama-3.1-70B"].config
    assert (llama.rope.rope_type, llama.max_position_embeddings) == ("llama3", 131072)


def test_checkpoint_dir(tmp_path, capsys):
    config = {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "intermediate_size": 688,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = resolve_model(tmp_path)
    arch = model.config
    assert model.name == str(tmp_path)
    assert (arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim) == (4, 2, 32)
    assert resolve_model(tmp_path / "config.json") == model
    assert kv_bytes_per_token(arch, "bf16") == (2 * 4 * 2 * 32 * 2, 0)
    assert cli_main(["kv-size", str(tmp_path), "--context", "1k", "--dtype", "bf16"]) == 0
    assert "1,024 tokens" in capsys.readouterr().out

    del config["num_key_value_heads"]
    config["head_dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = resolve_model(tmp_path).config
    assert (arch.num_key_value_heads, arch.head_dim) == (8, 64)


def test_checkpoint_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="num_attention_heads"):
        resolve_model(tmp_path)
    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{tmp_path}: .*num_key_value_heads=3"):
        resolve_model(tmp_path)
    # ModelConfig is Llama-family only, so is the calculator; the error names the checkpoint and the value
    gemma = config | {"model_type": "gemma", "num_key_value_heads": 1}
    (tmp_path / "config.json").write_text(json.dumps(gemma))
    with pytest.raises(ValueError, match=f"{tmp_path}: unsupported model_type 'gemma'"):
        resolve_model(tmp_path)


def test_checkpoint_dir_multimodal_and_sliding_window(tmp_path):
    """A multimodal config's text_config is sized; sliding-window layers are counted at the full context."""
    text = {
        "model_type": "mistral",
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_size": 5120,
        "intermediate_size": 32768,
        "vocab_size": 131072,
        "sliding_window": 4096,
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": text}))
    arch = resolve_model(tmp_path).config
    assert arch.sliding_window == 4096
    assert kv_bytes_per_request(arch, N_128K, "bf16") == (2 * 40 * 8 * 128 * 2 * N_128K, 0)


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("131072", 131072),
        ("128k", 131072),
        ("128K", 131072),
        ("1M", 1048576),
        ("1.5k", 1536),
        (" 32k ", 32768),
        (".5k", 512),
    ],
)
def test_parse_length(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("text", ["", "abc", "12x", "-5", "0", "1.3", "0.0001k", "1e6", "128 kb"])
def test_parse_length_bad_values_are_named(text):
    with pytest.raises(ValueError, match=f"bad length {text!r}".replace(".", r"\.")):
        parse_length(text)


def test_cli_bad_context_names_value(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["kv-size", "Llama-3.1-8B", "--context", "12x"])
    assert exc.value.code == 2
    assert "'12x'" in capsys.readouterr().err


def test_unknown_model_lists_presets(capsys):
    with pytest.raises(ValueError, match="unknown model 'gpt-5'") as exc:
        resolve_model("gpt-5")
    assert all(name in str(exc.value) for name in PRESETS)
    assert cli_main(["kv-size", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "gpt-5" in err and "meta-llama/Llama-3.1-70B" in err


def test_unknown_dtype():
    with pytest.raises(ValueError, match="'int2'.*bf16"):
        kv_bytes_per_token(PRESETS["Qwen/Qwen2.5-7B"].config, "int2")


def test_cli_policy_rows_are_bounded(capsys):
    """window:4096 on Llama-3.1-70B (320 KiB/token bf16): 4096 + 16 tokens in whole blocks -> 1.25 GiB."""
    assert (
        cli_main(
            [
                "kv-size",
                "Llama-3.1-70B",
                "--context",
                "128k",
                "--dtype",
                "bf16",
                "--policy",
                "window:4096",
                "--policy",
                "none",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert _row(out, "window:4096")[1:] == ["4,096", "4,112", "1.25"]
    assert _row(out, "none")[1:] == ["131,072", "131,072", "40.00"]
    assert cli_main(["kv-size", "Llama-3.1-70B", "--json", "--policy", "sinks:window=1000,num_sinks=4"]) == 0
    policies = json.loads(capsys.readouterr().out)["policies"]
    assert policies[0]["tokens_kept"] == 1004 and policies[0]["tokens_held"] == 16 * (1 + 63 + 1)
    assert cli_main(["kv-size", "Llama-3.1-70B", "--policy", "window:lots"]) == 2
    assert "'lots' is not a token budget" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_counts_what_the_model_holds(tied):
    """Equal to the built model's parameter count; a tied lm head shares the embedding (SmolLM2 showed
    0.16B for 0.135B when the tied head was counted twice)."""
    import torch

    from longreach.model.llama import LlamaForCausalLM

    arch = _config(tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    model.tie_weights()
    held = sum(p.numel() for p in model.parameters())  # tied parameters are yielded once
    assert num_params(arch) == held
