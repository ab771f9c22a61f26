"""vLLM's tokenizer endpoints: `POST /tokenize` (a prompt, or chat messages through the chat template, to token
ids), `POST /detokenize` (token ids to text) and `GET /version`, with vLLM's request and answer shapes:

    {"model"?, "prompt": "...", "add_special_tokens": true}          -> {"count", "max_model_len", "tokens"}
    {"model"?, "messages": [...], "add_generation_prompt": true}      -> the same
    {"model"?, "tokens": [...]}                                       -> {"prompt": "..."}

Text is tokenized exactly as /v1/completions (a prompt) and /v1/chat/completions (messages) tokenize it, so a
client can count a request's tokens before sending it. Bad input is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import Field, model_validator

import longreach
from longreach.serve import protocol as P


class TokenizeRequest(P._Request):
    """`prompt` or `messages`, not both."""

    model: str | None = Field(None, description="a served model name; absent: the first one")
    prompt: str | None = Field(None, description="text, tokenized as /v1/completions tokenizes it")
    messages: list[P.ChatMessage] | None = Field(
        None, description="chat messages, through the chat template as /v1/chat/completions does"
    )
    add_special_tokens: bool | None = Field(
        None,
        description="add the tokenizer's special tokens (BOS); absent: true for a prompt, false for messages "
        "(the template writes its own), as vLLM",
    )
    add_generation_prompt: bool = Field(True, description="messages only: end with the assistant's turn")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of 'prompt' and 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("messages: must contain at least one message")
        return self


class DetokenizeRequest(P._Request):
    model: str | None = Field(None, description="a served model name; absent: the first one")
    tokens: list[int] = Field(
        description="token ids in [0, vocabulary size)",
        json_schema_extra={"items": {"type": "integer", "minimum": 0}},
    )


async def tokenize(server, request: Request) -> dict[str, Any]:
    """POST /tokenize for an `OpenAIServer`."""
    server.authorize(request)
    req: TokenizeRequest = await server.read_request(request, TokenizeRequest)
    server.check_model(req.model)
    if req.messages is not None:
        text, param = server._chat_prompt(req, req.add_generation_prompt), "messages"
        add_special = bool(req.add_special_tokens)
    else:
        text, param = req.prompt, "prompt"
        add_special = req.add_special_tokens is not False
    ids = await server.encode(text, param, chat=not add_special)
    return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids}


async def detokenize(server, request: Request) -> dict[str, Any]:
    """POST /detokenize for an `OpenAIServer`."""
    server.authorize(request)
    req: DetokenizeRequest = await server.read_request(request, DetokenizeRequest)
    server.check_model(req.model)
    if server.tokenizer is None:
        raise P.APIError(
            400, "tokens: this model has no tokenizer, so ids cannot be turned into text", param="tokens"
        )
    vocab = server.engine.model.config.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise P.APIError(
            400, f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", param="tokens"
        )
    return {"prompt": server.tokenizer.decode(req.tokens, skip_special_tokens=False)}


def version() -> dict[str, str]:
    """GET /version."""
    return {"version": longreach.__version__}
