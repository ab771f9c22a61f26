"""Evaluating instruct models as they are used: each prompt as one user turn of the model's chat template.

- `ChatTemplateTokenizer(tokenizer)`: `encode(text)` is the ids of the checkpoint's chat template around
  `text` as a single user message with the generation prompt added -- what transformers'
  `apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)` returns (the
  template writes its own special tokens, so none are added). The runner sizes prompts with it, so the
  template's tokens count toward each context length, and `LocalBackend(apply_chat_template=True)` sends
  exactly these ids to the model.
- `chat_messages(prompt)`: the messages list the endpoint mode POSTs to /v1/chat/completions, where the
  server applies its own template (`EndpointBackend(api="chat")`).
"""

from __future__ import annotations

from typing import Any


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The prompt as a conversation of one user turn."""
    return [{"role": "user", "content": prompt}]


class ChatTemplateTokenizer:
    """A tokenizer whose `encode` wraps the text in the chat template first (see the module docstring)."""

    def __init__(self, tokenizer: Any):
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError(
                f"--apply-chat-template: the tokenizer ({type(tokenizer).__name__}) has no chat template"
            )
        try:
            tokenizer.apply_chat_template(chat_messages("x"), add_generation_prompt=True)
        except ValueError as exc:
            raise ValueError(f"--apply-chat-template: the checkpoint's chat template fails: {exc}") from None
        self.inner = tokenizer
        self.eos_token_ids = getattr(tokenizer, "eos_token_ids", ())

    def render(self, text: str) -> str:
        """The prompt text the model sees: the template around `text`."""
        return self.inner.apply_chat_template(chat_messages(text), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(self.render(text), add_bos=False))

    def decode(self, ids, **kwargs) -> str:
        return self.inner.decode(ids, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)
