"""Tokenizers: the demo model's byte tokenizer and Hugging Face `tokenizer.json` checkpoints.

- `ByteTokenizer`: ids 0..255 are raw UTF-8 bytes, then `<bos>`=256, `<eos>`=257, `<pad>`=258 (vocab 259).
  Any text round-trips exactly; undecodable byte runs come back as U+FFFD.
- `HFTokenizer`: a fast (Rust `tokenizers`) tokenizer plus the conventions transformers layers on top of it:
  special tokens from `tokenizer_config.json` (plain strings or AddedToken dicts with "content"),
  bos/eos added by the post-processor in tokenizer.json (transformers 5.x ignores the config's
  `add_bos_token` then) or, with no post-processor, by `add_bos_token` / `add_eos_token`; never a double bos,
  eos ids merged from `generation_config.json` and `config.json` (Llama 3 stops on several), and
  the checkpoint's chat templates.
- `load_tokenizer(path)` picks one by the files present.

Chat templates (finding, choosing and rendering them like transformers) live in `chat_template.py`;
`render_chat_template` is re-exported here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

from longreach.model.chat_template import (
    render_chat_template,
    select_chat_template,
    template_files,
    templates_from_config,
)

NUM_BYTE_TOKENS = 256
BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257
PAD_TOKEN_ID = 258
BYTE_VOCAB_SIZE = 259
BYTE_SPECIAL_TOKENS = {BOS_TOKEN_ID: "<bos>", EOS_TOKEN_ID: "<eos>", PAD_TOKEN_ID: "<pad>"}

BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: "
    "{% elif message['role'] == 'user' %}User: "
    "{% elif message['role'] == 'assistant' %}Assistant: "
    "{% else %}{{ raise_exception('unknown role ' ~ message['role'] ~ '; accepted: system, user, assistant') }}"
    "{% endif %}"
    "{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
# files save_pretrained copies for an HF tokenizer, when present
_HF_TOKENIZER_FILES = (
    TOKENIZER_JSON,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# the special-token names transformers passes to chat templates
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


# ---------------------------------------------------------------- byte tokenizer


class ByteTokenizer:
    """Raw UTF-8 bytes as ids 0..255, then <bos>=256, <eos>=257, <pad>=258."""

    bos_token_id = BOS_TOKEN_ID
    eos_token_id = EOS_TOKEN_ID
    pad_token_id = PAD_TOKEN_ID
    vocab_size = BYTE_VOCAB_SIZE
    eos_token_ids = frozenset({EOS_TOKEN_ID})
    bos_token = BYTE_SPECIAL_TOKENS[BOS_TOKEN_ID]
    eos_token = BYTE_SPECIAL_TOKENS[EOS_TOKEN_ID]
    pad_token = BYTE_SPECIAL_TOKENS[PAD_TOKEN_ID]

    def __init__(self, chat_template: str = BYTE_CHAT_TEMPLATE):
        self.chat_template = chat_template

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_TOKEN_ID, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Bytes -> text with invalid UTF-8 replaced by U+FFFD; special ids dropped or shown as '<bos>' etc."""
        pieces: list[str] = []
        run = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < NUM_BYTE_TOKENS:
                run.append(token_id)
            elif token_id in BYTE_SPECIAL_TOKENS:
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
                if not skip_special_tokens:
                    pieces.append(BYTE_SPECIAL_TOKENS[token_id])
            else:
                raise ValueError(
                    f"token id {token_id} out of range for ByteTokenizer: accepted 0..{BYTE_VOCAB_SIZE - 1}"
                )
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """'System: ...\\nUser: ...\\nAssistant: ...\\n' then 'Assistant:' when a reply is wanted."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "ByteTokenizer",
            "vocab_size": BYTE_VOCAB_SIZE,
            "bos_token": self.bos_token,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token": self.eos_token,
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token": self.pad_token,
            "pad_token_id": PAD_TOKEN_ID,
            "chat_template": self.chat_template,
        }
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ByteTokenizer":
        path = Path(directory) / TOKENIZER_CONFIG
        config = _read_json(path)
        if config is None:
            raise FileNotFoundError(f"{path}: not found; a ByteTokenizer directory holds {TOKENIZER_CONFIG}")
        if config.get("tokenizer_class") != "ByteTokenizer":
            raise ValueError(
                f"{path}: tokenizer_class is {config.get('tokenizer_class')!r}, expected 'ByteTokenizer'"
            )
        expected = {
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID,
            "vocab_size": BYTE_VOCAB_SIZE,
        }
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise ValueError(
                    f"{path}: {key}={config[key]!r} does not match ByteTokenizer's fixed {value}"
                )
        return cls(chat_template=config.get("chat_template") or BYTE_CHAT_TEMPLATE)


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from `tokenizer.json` with transformers' tokenizer_config conventions.

    `vocab_size` counts every id including added tokens (transformers' `len(tokenizer)`).
    """

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        tokenizer_path = self.directory / TOKENIZER_JSON
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{tokenizer_path}: not found")
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{tokenizer_path}: cannot be read by the tokenizers library ({exc})") from exc
        config = _read_json(self.directory / TOKENIZER_CONFIG) or {}
        legacy_map = _read_json(self.directory / "special_tokens_map.json") or {}
        self.config = config

        self.special_tokens: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name, legacy_map.get(name)))
            if content is not None:
                self.special_tokens[name] = content
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.bos_token_id = self._special_id("bos_token")
        # a pad token missing from the vocabulary only matters to batch padding, which we do with masks
        self.pad_token_id = (
            self._tokenizer.token_to_id(self.pad_token) if self.pad_token is not None else None
        )
        tokenizer_eos = self._special_id("eos_token")

        # eos ids: tokenizer's own first, then the model's generation settings (Llama 3.1: 128001, 128008, 128009)
        eos_ids = _as_id_list(tokenizer_eos)
        for name in ("generation_config.json", "config.json"):
            eos_ids += _as_id_list((_read_json(self.directory / name) or {}).get("eos_token_id"))
        self.eos_token_ids = frozenset(eos_ids)
        self.eos_token_id = eos_ids[0] if eos_ids else None

        # bos/eos: the post-processor in tokenizer.json decides, as in transformers 5.x (which drops the
        # config's add_bos_token/add_eos_token when tokenizer.json exists); the config flags only apply to a
        # tokenizer.json without a post-processor, where they are the sole record of the intent.
        self._post_processor_decides = self._tokenizer.post_processor is not None
        if self._post_processor_decides:
            probe = self._tokenizer.encode("", add_special_tokens=True).ids
            self.add_bos_token = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
            self.add_eos_token = (
                tokenizer_eos is not None
                and len(probe) > int(self.add_bos_token)
                and probe[-1] == tokenizer_eos
            )
        else:
            self.add_bos_token = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None
            self.add_eos_token = bool(config.get("add_eos_token", False)) and tokenizer_eos is not None
        self._tokenizer_eos_id = tokenizer_eos
        self._cleanup_spaces = (
            bool(config.get("clean_up_tokenization_spaces", False))
            and type(self._tokenizer.model).__name__ != "BPE"
        )

        self.chat_template, self.chat_templates = self._read_chat_templates(config)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "HFTokenizer":
        return cls(directory)

    def _special_id(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        if content is None:
            return None
        token_id = self._tokenizer.token_to_id(content)
        if token_id is None:
            raise ValueError(
                f"{self.directory / TOKENIZER_CONFIG}: {name} {content!r} is not in the vocabulary "
                f"of {self.directory / TOKENIZER_JSON}"
            )
        return token_id

    def _read_chat_templates(self, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
        """(default template, all named templates). As in transformers, template files (chat_template.jinja,
        additional_chat_templates/NAME.jinja) replace the tokenizer_config.json entry when present."""
        templates = template_files(self.directory)
        if templates:
            return templates.get("default"), templates
        raw = config.get("chat_template")
        if raw is None:  # processors (multimodal checkpoints) keep it in chat_template.json
            raw = (_read_json(self.directory / "chat_template.json") or {}).get("chat_template")
        templates = templates_from_config(raw)
        return templates.get("default"), templates

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the tokenizer's own default (as transformers'
        `encode`); True/False force it. A text that already starts with the bos token never gets a second."""
        if add_bos is None and self._post_processor_decides:
            ids = self._tokenizer.encode(text, add_special_tokens=True).ids
        else:
            want_bos = self.add_bos_token if add_bos is None else add_bos
            if want_bos and self.bos_token_id is None:
                raise ValueError(f"add_bos=True but the tokenizer in {self.directory} has no bos_token")
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
            if want_bos:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token:
                ids.append(self._tokenizer_eos_id)
        if self.bos_token_id is not None and ids[:2] == [self.bos_token_id, self.bos_token_id]:
            ids = ids[1:]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if (
            self._cleanup_spaces
        ):  # transformers' legacy WordPiece clean-up, skipped for BPE as transformers does
            for before, after in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                text = text.replace(before, after)
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`. `chat_template` may name one of the tokenizer's templates or be a
        template string; with tools and no name, a 'tool_use' template is preferred when there is one."""
        template = select_chat_template(
            self.chat_templates, self.chat_template, chat_template, tools, self.directory
        )
        if template is None:
            raise ValueError(
                f"{self.directory}: the tokenizer has no chat template (looked in {TOKENIZER_CONFIG} "
                "and chat_template.jinja)"
            )
        template_kwargs = {**self.special_tokens, **kwargs}
        return render_chat_template(
            template, messages, add_generation_prompt, tools=tools, documents=documents, **template_kwargs
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Copy the tokenizer files; generation_config.json too (it carries eos ids) unless one is there."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if directory.resolve() == self.directory.resolve():
            return
        for name in _HF_TOKENIZER_FILES:
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, directory / name)
        extra_dir = self.directory / "additional_chat_templates"
        if extra_dir.is_dir():
            shutil.copytree(extra_dir, directory / extra_dir.name, dirs_exist_ok=True)
        source_generation = self.directory / "generation_config.json"
        if source_generation.is_file() and not (directory / source_generation.name).exists():
            shutil.copyfile(source_generation, directory / source_generation.name)


# ---------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer stored at `path`: a checkpoint directory, or its tokenizer.json / tokenizer_config.json.

    tokenizer.json -> HFTokenizer; tokenizer_config.json with "tokenizer_class": "ByteTokenizer" -> ByteTokenizer.
    A .gguf file or a Hub id resolves as for `load_model` (`resolve.resolve_model`).
    """
    path = Path(path).expanduser()
    if path.suffix == ".gguf" or not path.exists():
        from longreach.model.resolve import is_hub_id, resolve_model  # lazy: pulls in the gguf reader

        if path.is_file() or is_hub_id(str(path)):
            path = resolve_model(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or directory (expected a directory holding "
            f"{TOKENIZER_JSON} or a ByteTokenizer {TOKENIZER_CONFIG})"
        )
    if path.is_file():
        if path.name not in (TOKENIZER_JSON, TOKENIZER_CONFIG):
            raise ValueError(
                f"{path}: not a tokenizer file; give its directory, {TOKENIZER_JSON} or {TOKENIZER_CONFIG}"
            )
        path = path.parent
    if (path / TOKENIZER_JSON).is_file():
        return HFTokenizer(path)
    config = _read_json(path / TOKENIZER_CONFIG)
    if config is not None:
        if config.get("tokenizer_class") == "ByteTokenizer":
            return ByteTokenizer.from_pretrained(path)
        raise ValueError(
            f"{path}: {TOKENIZER_CONFIG} names tokenizer_class {config.get('tokenizer_class')!r} but "
            f"there is no {TOKENIZER_JSON}; supported: a fast tokenizer ({TOKENIZER_JSON}) or ByteTokenizer"
        )
    if (path / "tokenizer.model").is_file():
        raise ValueError(
            f"{path}: only a SentencePiece tokenizer.model is there; convert it once with transformers "
            f"(AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes {TOKENIZER_JSON})"
        )
    raise FileNotFoundError(
        f"{path}: no tokenizer there (expected {TOKENIZER_JSON} or a ByteTokenizer {TOKENIZER_CONFIG})"
    )
