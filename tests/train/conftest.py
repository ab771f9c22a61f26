"""Tiny corpora and configs for the training tests (hidden 32, 2 layers, byte tokenizer)."""

import json
import random

import pytest

TINY_MODEL = dict(
    model_type="llama",
    vocab_size=259,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the quiet woods".split()


def write_corpus(directory, num_docs=120, seed=0):
    """Length-skewed JSONL (log-normal word counts) plus one long text file."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(directory / "docs.jsonl", "w") as f:
        for _ in range(num_docs):
            n = int(rng.lognormvariate(2.5, 1.0)) + 1
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    (directory / "book.txt").write_text(
        "".join(f"Line {i}: {' '.join(rng.choice(WORDS) for _ in range(8))}.\n" for i in range(60))
    )
    return directory


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def tiny_config_dict(corpus, output_dir, **sections):
    d = {
        "model": {"config": dict(TINY_MODEL)},
        "data": {"paths": [str(corpus)], "seq_len": 64},
        "optimizer": {"lr": 1e-2},
        "schedule": {"max_steps": 6, "warmup_steps": 2},
        "training": {"batch_size": 4, "micro_batch_size": 1, "dtype": "fp32", "progress": False},
        "checkpoint": {"output_dir": str(output_dir)},
    }
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return d


def to_toml(d) -> str:
    """Enough TOML for our config dicts (tables of scalars, lists and inline tables)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items()) + "\n"
        for name, table in d.items()
    )
