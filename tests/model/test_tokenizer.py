"""ByteTokenizer round trips, and HFTokenizer parity with transformers on a tokenizer built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longreach.model.tokenizer import (
    BOS_TOKEN_ID,
    BYTE_VOCAB_SIZE,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
)

# ---------------------------------------------------------------- ByteTokenizer


def test_byte_constants():
    tok = ByteTokenizer()
    assert (BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, BYTE_VOCAB_SIZE) == (256, 257, 258, 259)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.eos_token_ids == {257}


@pytest.mark.parametrize("text", ["", "hello world", "naïve café — 日本語 🦙", "tab\tnew\nline\x00nul"])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text, add_bos=True)
    assert with_bos == [256, *ids]
    assert tok.decode(with_bos + [257, 258]) == text
    assert tok.decode(with_bos + [257], skip_special_tokens=False) == f"<bos>{text}<eos>"


def test_byte_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, ord("a"), 0xC3]) == "\ufffda\ufffd"
    # a multi-byte character cut by a special token decodes each side on its own
    euro = list("€".encode("utf-8"))
    assert tok.decode(euro[:2] + [EOS_TOKEN_ID] + euro[2:]) == "\ufffd\ufffd"
    assert tok.decode(euro) == "€"


def test_byte_decode_out_of_range_names_the_id():
    with pytest.raises(ValueError, match=r"259.*0\.\.258"):
        ByteTokenizer().decode([1, 259])


def test_byte_chat_template():
    tok = ByteTokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    assert (
        tok.apply_chat_template(messages)
        == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: 2+2?\nAssistant:"
    )
    assert (
        tok.apply_chat_template(messages[:2], add_generation_prompt=False) == "System: Be brief.\nUser: Hi\n"
    )
    with pytest.raises(ValueError, match="unknown role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_byte_save_load_round_trip(tmp_path):
    ByteTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ByteTokenizer"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.decode(loaded.encode("ünïcode", add_bos=True)) == "ünïcode"
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "User: x\nAssistant:"
    assert isinstance(load_tokenizer(tmp_path / "tokenizer_config.json"), ByteTokenizer)


def test_byte_config_with_wrong_ids_is_rejected(tmp_path):
    ByteTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token_id"] = 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token_id=2"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- HFTokenizer vs transformers

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 71432. Remember it. 71432 is the pass key.",
    "Long context models need positions that extrapolate, attention that fits and a cache that is cheap.",
    "naïve café, 日本語のテキスト, emoji 🦙 and code: def f(x): return x * 2",
] * 4
# Llama 3's chat template (meta-llama/Meta-Llama-3-8B-Instruct)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# exercises the helpers transformers provides: namespace, tojson, raise_exception, strftime_now, loop controls
HELPERS_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}\n"
    "{{- bos_token }}date={{ strftime_now('%Y') }}\n"
    "{% if tools %}tools={{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}\n"
    "  {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
    "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
    "  {% set ns.n = ns.n + 1 %}\n"
    "  [{{ ns.n }}] {{ m.role }}: {{ m.content }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}[{{ ns.n + 1 }}] assistant:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You answer briefly & <exactly>."},
    {"role": "user", "content": "  What is the pass key?  "},
    {"role": "assistant", "content": "71432"},
    {"role": "user", "content": "Say it in 日本語 🦙"},
]
TEXTS = [
    "",
    "The pass key is 71432.",
    "naïve café 日本語 🦙 unseen-words!!",
    "  leading and trailing  ",
    "<|begin_of_text|>already has bos",
    "a<|eot_id|>b",
]


def _write_hf_tokenizer(
    directory: Path, *, post_processor_bos: bool, config_extra: dict | None = None
) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if post_processor_bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": {
            "__type": "AddedToken",
            "content": "<|eot_id|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": True,
        "chat_template": LLAMA3_TEMPLATE,
        **(config_extra or {}),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """Llama 3 style: the post-processor adds bos; generation_config lists extra eos ids."""
    directory = _write_hf_tokenizer(tmp_path_factory.mktemp("llama3"), post_processor_bos=True)
    end_of_text = json.loads((directory / "tokenizer.json").read_text())["added_tokens"][1]["id"]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, 4]}))
    return directory


def _transformers_tokenizer(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def test_hf_matches_transformers(llama3_dir):
    ours = load_tokenizer(llama3_dir)
    theirs = _transformers_tokenizer(llama3_dir)
    assert isinstance(ours, HFTokenizer)
    assert ours.bos_token_id == theirs.bos_token_id == 0
    assert ours.eos_token_id == theirs.eos_token_id == 4
    assert ours.eos_token_ids == {1, 4}
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        expected = theirs.encode(text)
        if text.startswith("<|begin_of_text|>"):  # transformers doubles the bos here; we don't
            assert expected[:2] == [0, 0]
            expected = expected[1:]
        assert ours.encode(text) == expected, text
        assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False), text
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), text
    assert ours.decode(ours.encode(TEXTS[2])) == TEXTS[2]


def test_hf_chat_template_matches_transformers(llama3_dir):
    ours = load_tokenizer(llama3_dir)
    theirs = _transformers_tokenizer(llama3_dir)
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        got = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        assert got == expected
    prompt = ours.apply_chat_template(MESSAGES)
    assert prompt.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer briefly"
    )
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # the rendered prompt already holds bos: encoding it must not add a second one
    ids = ours.encode(prompt)
    assert ids[:2] != [0, 0] and ids[0] == 0
    assert ids == theirs.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )

    tools = [{"type": "function", "function": {"name": "get_key", "parameters": {"type": "object"}}}]
    for template_kwargs in ({}, {"tools": tools}):
        expected = theirs.apply_chat_template(
            MESSAGES,
            tokenize=False,
            chat_template=HELPERS_TEMPLATE,
            add_generation_prompt=True,
            **template_kwargs,
        )
        assert (
            ours.apply_chat_template(MESSAGES, chat_template=HELPERS_TEMPLATE, **template_kwargs) == expected
        )
    with pytest.raises(ValueError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=HELPERS_TEMPLATE)


def test_hf_add_bos_token_without_post_processor_and_template_list(tmp_path):
    """No post-processor in tokenizer.json: the config's add_bos_token is the only record, and we honour it
    (transformers 5.x's generic backend drops it); templates given as a list of {name, template}."""
    templates = [
        {"name": "default", "template": LLAMA3_TEMPLATE},
        {"name": "tool_use", "template": HELPERS_TEMPLATE},
    ]
    directory = _write_hf_tokenizer(
        tmp_path / "tok",
        post_processor_bos=False,
        config_extra={"add_bos_token": True, "add_eos_token": False, "chat_template": templates},
    )
    ours = load_tokenizer(directory)
    theirs = _transformers_tokenizer(directory)
    for text in TEXTS[:4]:
        assert ours.encode(text) == [0, *theirs.encode(text, add_special_tokens=False)], text
        assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False), text
    assert ours.apply_chat_template(MESSAGES) == theirs.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(MESSAGES, chat_template="tool_use") == theirs.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, chat_template="tool_use"
    )
    assert ours.apply_chat_template(MESSAGES, tools=[]).startswith("<|begin_of_text|>date=")


def test_hf_post_processor_wins_over_config_flag(tmp_path):
    directory = _write_hf_tokenizer(
        tmp_path / "tok", post_processor_bos=True, config_extra={"add_bos_token": False}
    )
    ours = load_tokenizer(directory)
    theirs = _transformers_tokenizer(directory)
    assert ours.encode("The sky") == theirs.encode("The sky") == [0, *ours.encode("The sky", add_bos=False)]


def test_hf_without_bos_by_default(tmp_path):
    directory = _write_hf_tokenizer(tmp_path / "tok", post_processor_bos=False)
    ours = load_tokenizer(directory)
    assert ours.encode("The sky") == ours.encode("The sky", add_bos=False)
    assert ours.encode("The sky", add_bos=True) == [0, *ours.encode("The sky")]
    assert ours.encode("The sky") == _transformers_tokenizer(directory).encode("The sky")


def test_hf_chat_template_from_jinja_file_and_save_round_trip(llama3_dir, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("tokenizer.json", "generation_config.json"):
        (source / name).write_bytes((llama3_dir / name).read_bytes())
    config = json.loads((llama3_dir / "tokenizer_config.json").read_text())
    # template files replace the config's entry, as in transformers
    (source / "chat_template.jinja").write_text(config.pop("chat_template"))
    config["chat_template"] = "ignored {{ messages }}"
    (source / "additional_chat_templates").mkdir()
    (source / "additional_chat_templates" / "tool_use.jinja").write_text(HELPERS_TEMPLATE)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(source)
    assert tok.chat_template == LLAMA3_TEMPLATE
    theirs = _transformers_tokenizer(source)
    for name in (None, "tool_use"):
        assert tok.apply_chat_template(MESSAGES, chat_template=name) == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, chat_template=name
        )

    out = tmp_path / "out"
    tok.save_pretrained(out)
    again = load_tokenizer(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "additional_chat_templates",
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert again.chat_templates == tok.chat_templates
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert again.eos_token_ids == tok.eos_token_ids
    assert again.apply_chat_template(MESSAGES) == load_tokenizer(llama3_dir).apply_chat_template(MESSAGES)
    assert isinstance(load_tokenizer(out / "tokenizer.json"), HFTokenizer)


def test_hf_missing_chat_template_names_the_directory(tmp_path):
    directory = _write_hf_tokenizer(
        tmp_path / "tok", post_processor_bos=True, config_extra={"chat_template": None}
    )
    with pytest.raises(ValueError, match=str(directory)):
        load_tokenizer(directory).apply_chat_template(MESSAGES)


# ---------------------------------------------------------------- errors


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_tokenizer(missing)


def test_directory_without_tokenizer_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_unsupported_tokenizers_are_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=f"{tmp_path}.*tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match="LlamaTokenizer"):
        load_tokenizer(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin"):
        load_tokenizer(other)


def test_bad_json_and_unknown_special_token_are_named(tmp_path, llama3_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad"):
        load_tokenizer(bad)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "tokenizer.json").write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    (odd / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="bos_token '<s>'"):
        load_tokenizer(odd)
