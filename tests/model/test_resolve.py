"""One resolver: a .gguf file and a Hub id work wherever a checkpoint directory does."""

import json
import os

import pytest
import torch

from longreach.model.bundled import resolve_model_path
from longreach.model.loader import load_model
from longreach.model.resolve import GGUF_SOURCE, gguf_source
from longreach.model.tokenizer import load_tokenizer
from tests.model.conftest import make_hf_model
from tests.model.gguf_writer import CHAT_TEMPLATE, VOCAB_SIZE, write_gguf

transformers = pytest.importorskip("transformers")

MIXED = [
    "Hello world, the answer is 42.",
    "  leading spaces\tand tabs\n\nnew lines  ",
    "héllo ünïcode 日本語 🤖 — “quotes”",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "3.14159 + 2e-10 = 1,234,567",
]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path):
    source = make_hf_model("llama", vocab_size=VOCAB_SIZE)
    path = tmp_path / "files" / "tiny.Q8_0.gguf"
    path.parent.mkdir()
    write_gguf(path, source, "Q8_0")
    return path, source


def test_gguf_resolves_to_one_cache_directory(cache, tiny_gguf):
    path, _ = tiny_gguf
    directory = resolve_model_path(str(path))
    assert directory.parent.parent == cache / "gguf" and directory.name == "tiny.Q8_0"
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", GGUF_SOURCE} <= names
    assert gguf_source(directory) == path.resolve()
    stamp = (directory / "config.json").stat().st_mtime_ns
    assert resolve_model_path(str(path)) == directory  # reused, not rewritten
    assert (directory / "config.json").stat().st_mtime_ns == stamp
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a changed file gets a fresh entry
    assert resolve_model_path(str(path)) != directory
    with pytest.raises(ValueError, match="changed since"):
        load_model(directory)


def test_model_and_tokenizer_through_the_cache_directory(cache, tiny_gguf):
    path, _ = tiny_gguf
    directory = resolve_model_path(str(path))
    ids = torch.arange(20)
    with torch.no_grad():
        assert torch.equal(load_model(directory)(ids), load_model(path)(ids))
    assert load_tokenizer(directory).encode("the cat") == load_tokenizer(path).encode("the cat")


def test_tokenizer_and_chat_template_equal_transformers(cache, tiny_gguf):
    path, _ = tiny_gguf
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in MIXED:
        assert ours.encode(text) == theirs.encode(text), text
        for skip in (False, True):
            ids = ours.encode(text)
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.bos_token_id == theirs.bos_token_id and ours.eos_token_id == theirs.eos_token_id
    assert ours.chat_template == CHAT_TEMPLATE
    for chat in CHATS:
        assert ours.apply_chat_template(chat) == theirs.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )


def test_convert_writes_a_directory_transformers_loads(cache, tiny_gguf, tmp_path):
    from longreach.cli import main

    path, _ = tiny_gguf
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(30)
    with torch.no_grad():
        want, got = theirs(ids[None]).logits[0], load_model(path)(ids)
    assert (got - want).abs().max().item() <= 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(path)
    for text in MIXED:
        assert tokenizer.encode(text) == ours.encode(text), text
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == ours.eos_token_id


def test_convert_errors_name_the_input(tmp_path, capsys):
    from longreach.cli import main

    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "missing.gguf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _fake_hub(root, repo_id, files: dict):
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())
    return snapshot


def test_hub_id_resolves_from_the_local_cache(hf_checkpoint, tmp_path, monkeypatch, cache, tiny_gguf):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    directory, source = hf_checkpoint("qwen2")
    snapshot = _fake_hub(hub, "acme/tiny-qwen", {p.name: p for p in directory.iterdir()})
    assert resolve_model_path("acme/tiny-qwen") == snapshot
    ids = torch.arange(10)
    with torch.no_grad():
        want = source(ids[None]).logits[0]
        assert (load_model("acme/tiny-qwen")(ids) - want).abs().max().item() <= 1e-5
    gguf_path, _ = tiny_gguf
    _fake_hub(hub, "acme/tiny-gguf", {gguf_path.name: gguf_path})
    for model_id in ("acme/tiny-gguf", f"acme/tiny-gguf/{gguf_path.name}"):
        assert gguf_source(resolve_model_path(model_id)).name == gguf_path.name
    assert load_tokenizer("acme/tiny-gguf").encode("the") == load_tokenizer(gguf_path).encode("the")


def test_unknown_hub_id_names_it_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(FileNotFoundError) as info:
        load_model("nobody/no-such-model")
    message = str(info.value)
    assert "'nobody/no-such-model'" in message and str(tmp_path / "empty-hub") in message
    assert "hf download nobody/no-such-model" in message and "HF_HUB_OFFLINE" in message


def test_llm_generate_cli_and_extend_take_a_gguf(cache, tiny_gguf, tmp_path, capsys):
    from longreach import LLM, SamplingParams
    from longreach.cli import main

    path, _ = tiny_gguf
    llm = LLM(str(path), num_kv_blocks=16, block_size=8)
    out = llm.generate(["the cat"], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    assert len(out[0].token_ids) == 3
    assert main(["generate", "--model", str(path), "--prompt", "the", "--max-tokens", "2"]) == 0
    run = tmp_path / "ext"
    argv = ["extend", "--model", str(path), "--rope", "yarn", "--factor", "2", "--max-steps", "0"]
    assert main([*argv, "--output", str(run)]) == 0
    extended = load_model(run / "final")
    assert extended.config.rope.rope_type == "yarn"
    assert (run / "final" / "tokenizer.json").is_file()


def test_kv_size_takes_a_gguf(cache, tiny_gguf):
    from longreach.kvcache.presets import resolve_model

    path, source = tiny_gguf
    named = resolve_model(str(path))
    assert (
        named.name.endswith("tiny.Q8_0") and named.config.num_hidden_layers == source.config.num_hidden_layers
    )
