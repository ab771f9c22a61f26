"""LLM.chat (vLLM's): the chat template's tokens, exactly transformers' apply_chat_template(tokenize=True), then
generate; conversations batched, a template string or name chosen per call, bad input named."""

import json

import pytest

from longreach import LLM, SamplingParams
from tests.model.conftest import make_hf_model

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the pass key?"}]
OTHER = [{"role": "user", "content": "Say hi."}]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer that adds BOS itself (so a template's own BOS must not be doubled)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = tmp_path_factory.mktemp("chat-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([json.dumps(CHAT + OTHER)] * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    templates = [{"name": "default", "template": TEMPLATE}, {"name": "plain", "template": PLAIN}]
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": templates}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model = make_hf_model(
        vocab_size=tok.get_vocab_size(), max_position_embeddings=512, bos_token_id=0, eos_token_id=1
    )
    model.save_pretrained(path)
    return path


def _hf_ids(path, messages, **kwargs):
    import transformers

    out = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tokenize=True, **kwargs
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    return LLM(chat_checkpoint, dtype="fp32", device="cpu", block_size=8, num_kv_blocks=128)


def test_chat_equals_generate_on_transformers_template_tokens(llm, chat_checkpoint):
    ids = _hf_ids(chat_checkpoint, CHAT, add_generation_prompt=True)
    assert ids.count(0) == 1  # one BOS: the template's
    (out,) = llm.chat(CHAT, GREEDY, use_tqdm=False)
    (ref,) = llm.generate([ids], GREEDY, use_tqdm=False)
    assert out.prompt_token_ids == ids and out.token_ids == ref.token_ids and out.text == ref.text


def test_chat_batches_conversations_and_options(llm, chat_checkpoint):
    outs = llm.chat([CHAT, OTHER], GREEDY, use_tqdm=False, add_generation_prompt=False)
    expected = [_hf_ids(chat_checkpoint, c, add_generation_prompt=False) for c in (CHAT, OTHER)]
    assert [o.prompt_token_ids for o in outs] == expected
    (named,) = llm.chat(OTHER, GREEDY, use_tqdm=False, chat_template="plain")
    assert named.prompt_token_ids == _hf_ids(chat_checkpoint, OTHER, chat_template=PLAIN)
    (inline,) = llm.chat(OTHER, GREEDY, use_tqdm=False, chat_template=PLAIN)
    assert inline.prompt_token_ids == named.prompt_token_ids


def test_chat_on_the_byte_tokenizer_takes_a_template_string(byte_llama):
    llm = LLM(byte_llama[0], dtype="fp32", device="cpu", block_size=8, num_kv_blocks=64)
    (out,) = llm.chat(OTHER, GREEDY, use_tqdm=False, chat_template=PLAIN)
    assert out.prompt_token_ids == list(b"user: Say hi.\n")


@pytest.mark.parametrize(
    "messages, match", [([], "non-empty list"), ([[]], "conversation 0 is empty"), ("hi", "non-empty list")]
)
def test_chat_bad_messages_are_named(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(messages, GREEDY)


def test_chat_without_a_tokenizer_is_refused(tiny_llama):
    llm = LLM(tiny_llama[0], dtype="fp32", device="cpu", block_size=8, num_kv_blocks=32)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        llm.chat(OTHER, GREEDY)
