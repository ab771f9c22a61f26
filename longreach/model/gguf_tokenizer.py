"""A GGUF file's tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) -> `tokenizer.json` and
`tokenizer_config.json` contents, which `longreach.model.tokenizer.HFTokenizer` (and transformers) load.

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by SmolLM, Llama 3, Qwen2 and most recent models):
the vocabulary in GPT-2's byte-to-unicode spelling, the merges as written, control tokens (type 3) as special
added tokens and user-defined ones (type 4) as plain added tokens, so they are matched whole as llama.cpp does.
Text is split as llama.cpp splits it for the file's `tokenizer.ggml.pre` (its `llama-vocab.cpp` regexes);
an unknown pre-tokenizer name falls back to GPT-2's split, as llama.cpp does.

SentencePiece BPE (`"llama"`: Llama 2, Mistral 7B): as transformers' GGUF loader builds it (merges derived from the
token scores, Metaspace, byte fallback), bos added unless the file says otherwise (llama.cpp's default).
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from longreach.model.gguf import GGUFError, GGUFFile

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex llama.cpp splits with before BPE (GPT-2's when absent)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# pre-tokenizers that split every digit on its own, then GPT-2's regex
_DIGIT_SPLITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
# Llama 3's tokenizer.json sets ignore_merges, and llama.cpp does so for these pre-tokenizers
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE spells tokens with it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str | None):
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return gpt2


def _byte_level_model(g: GGUFFile, tokens: list[str], pre: str | None) -> models.BPE:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:  # a token stored as raw text: spell its bytes
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = []
    for merge in g.get("tokenizer.ggml.merges") or []:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{g.path}: merge {merge!r} in tokenizer.ggml.merges is not two tokens")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise GGUFError(f"{g.path}: a byte-level BPE tokenizer (gpt2) without tokenizer.ggml.merges")
    return models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES)


def _special(g: GGUFFile, tokens: list[str], key: str) -> tuple[int | None, str | None]:
    token_id = g.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return None, None
    if not 0 <= int(token_id) < len(tokens):
        raise GGUFError(
            f"{g.path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary (0..{len(tokens) - 1})"
        )
    return int(token_id), tokens[int(token_id)]


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE files list no merges: every split of a token into two vocabulary tokens, best-scored
    merged token first (transformers' `generate_merges` order, ties kept in vocabulary order)."""
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    found = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _sentencepiece(g: GGUFFile, tokens: list[str]) -> Tokenizer:
    """SentencePiece BPE (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral 7B): '▁' for spaces, a '▁' before the
    text when `add_space_prefix` (the default), unknown bytes as <0xXX> tokens."""
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = g.get("tokenizer.ggml.merges")
    if merges:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = g.get("tokenizer.ggml.scores")
        if scores is None:
            raise GGUFError(
                f"{g.path}: a SentencePiece tokenizer with neither merges nor tokenizer.ggml.scores"
            )
        merges = _merges_from_scores(tokens, [float(x) for x in scores])
    _, unk = _special(g, tokens, "unknown_token_id")
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    scheme = "first" if prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tokenizer


def _add_bos(g: GGUFFile) -> bool:
    """llama.cpp adds bos to a SentencePiece vocabulary unless the file says otherwise; to byte-level BPE only
    when it says so."""
    return bool(g.get("tokenizer.ggml.add_bos_token", g.get("tokenizer.ggml.model") == "llama"))


def build_tokenizer(g: GGUFFile) -> Tokenizer:
    """The `tokenizers.Tokenizer` the file's metadata describes."""
    kind = g.get("tokenizer.ggml.model")
    tokens = g.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFError(
            f"{g.path}: no tokenizer in the metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)"
        )
    tokens = [str(t) for t in tokens]
    if kind == "gpt2":
        pre = g.get("tokenizer.ggml.pre")
        tokenizer = Tokenizer(_byte_level_model(g, tokens, pre))
        tokenizer.pre_tokenizer = _pre_tokenizer(pre)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = set(bytes_to_unicode().values())
    elif kind == "llama":
        tokenizer, alphabet = _sentencepiece(g, tokens), None
    else:
        raise GGUFError(
            f"{g.path}: tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece BPE)"
        )
    types = list(g.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    # a byte-level control token outside the byte alphabet is a llama.cpp mislabel with no id in the model
    control = [t for t, k in zip(tokens, types) if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and tokenizer.token_to_id(t) is not None]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    tokenizer.post_processor = _post_processor(g, tokens, byte_level=kind == "gpt2")
    return tokenizer


def _post_processor(g: GGUFFile, tokens: list[str], byte_level: bool):
    """bos/eos added as `tokenizer.ggml.add_bos_token` / `add_eos_token` say (see `_add_bos` for the default)."""
    single, specials = ["$A"], []
    for key, wanted in (
        ("bos_token_id", _add_bos(g)),
        ("eos_token_id", g.get("tokenizer.ggml.add_eos_token")),
    ):
        token_id, token = _special(g, tokens, key)
        if token is not None and bool(wanted):
            specials.append((token, token_id))
            single = [token, *single] if key == "bos_token_id" else [*single, token]
    if not specials:
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    pair = single + ["$B" if s == "$A" else s for s in single]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def tokenizer_config(g: GGUFFile) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, add_bos/add_eos, the chat template(s) and the context length."""
    tokens = [str(t) for t in g.get("tokenizer.ggml.tokens") or []]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": _add_bos(g),
        "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(g.arch("context_length") or 2048),
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        _, token = _special(g, tokens, key)
        if token is not None:
            config[name] = token
    default = g.get("tokenizer.chat_template")
    named = {
        key.removeprefix("tokenizer.chat_template."): str(g.get(key))
        for key in g.reader.fields
        if key.startswith("tokenizer.chat_template.")
    }
    if named:
        listed = ([{"name": "default", "template": str(default)}] if default is not None else []) + [
            {"name": name, "template": template} for name, template in named.items()
        ]
        config["chat_template"] = listed
    elif default is not None:
        config["chat_template"] = str(default)
    return config


def tokenizer_files(g: GGUFFile) -> dict[str, str]:
    """File name -> text of the tokenizer files for a Hugging Face directory."""
    return {
        "tokenizer.json": build_tokenizer(g).to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tokenizer_config(g), indent=2, ensure_ascii=False) + "\n",
    }
