"""The server's OpenAPI schema (`/openapi.json`, `/docs`): request bodies, answers and errors of every route.

The handlers read and validate the raw body themselves (so that every error keeps OpenAI's shape and a
size limit applies before parsing), which hides the bodies from FastAPI; the routes therefore declare them
here: `json_body(Model)` names the pydantic request model, `responses(...)` the answer and the errors a
route can give, and `install` adds the request models to the schema's components. The response models below
are documentation only (the handlers build plain dicts); tests check the answers against them.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

REF = "#/components/schemas/{model}"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Doc):
    message: str = Field(description="what was wrong, naming the bad value and what is accepted")
    type: str = Field(description="invalid_request_error or server_error")
    param: str | None = Field(description="the request field at fault (dotted path), if one is")
    code: str | None = Field(
        description="e.g. invalid_value, missing, invalid_json, context_length_exceeded, "
        "model_not_found, invalid_api_key, request_too_large, shutting_down"
    )


class ErrorResponse(_Doc):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: dict[str, Any] | None = Field(description="tokens, token_logprobs, top_logprobs, text_offset")
    finish_reason: Literal["stop", "length", "abort"] | None


class CompletionResponse(_Doc):
    """The answer of /v1/completions; with `stream` true each server-sent event holds one such object
    (one choice; `usage` only in the last one, with `stream_options.include_usage`), then `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = Field(description="content: one entry per token, with top_logprobs")
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionResponse(_Doc):
    """The answer of /v1/chat/completions; with `stream` true the server-sent events hold
    chat.completion.chunk objects (`delta` in place of `message`), then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int = Field(description="longest prompt + completion, in tokens")


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Doc):
    status: Literal["ok", "shutting down", "engine failing"]


class TokenizeResponse(_Doc):
    count: int = Field(description="number of tokens")
    max_model_len: int = Field(description="longest prompt + completion, in tokens")
    tokens: list[int]


class DetokenizeResponse(_Doc):
    prompt: str


class Version(_Doc):
    version: str = Field(description="longreach's version")


SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": (
                "one chunk as JSON (the answer's shape, one choice, `delta` in place of `message` for chat); "
                "the last event is `[DONE]`"
            ),
        }
    },
}

ERRORS = {
    400: (
        "malformed or invalid request: not UTF-8 or JSON, a field of the wrong type or out of range, an empty or "
        "too long prompt, token ids outside the vocabulary, an unsupported feature"
    ),
    401: "missing or wrong `Authorization: Bearer` key (only with --api-key)",
    404: "no model of that name is served",
    413: "the body is larger than --max-request-bytes",
    503: "the server is shutting down",
}


def responses(
    ok: type[BaseModel] | None, *errors: int, ok_description: str = "success", stream: bool = False
) -> dict[int | str, dict[str, Any]]:
    """FastAPI's `responses=` for a route: its 200 answer (`ok`; also server-sent events when `stream`) and the
    error statuses it can give, each an `ErrorResponse`."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": ok_description}
        if stream:  # before OpenAPI 3.2 (itemSchema) an event stream's schema describes one event
            out[200]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    for status in errors:
        out[status] = {"model": ErrorResponse, "description": ERRORS[status]}
    return out


HEALTH_RESPONSES = {
    200: {"model": Health, "description": "the engine is serving"},
    503: {"model": Health, "description": "shutting down, or the engine's last step failed"},
}
METRICS_RESPONSES = {
    200: {
        "description": "Prometheus text format, names prefixed longreach_",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """FastAPI's `openapi_extra=` declaring `model` as the route's (required) JSON body."""
    ref = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install(app: FastAPI, request_models: list[type[BaseModel]], *, has_api_key: bool) -> None:
    """Make `app.openapi()` include `request_models` (and what they refer to) as components and, with an API
    key, a bearer security scheme on the /v1 routes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for operations in schema["paths"].values():  # FastAPI's 422 for path parameters: a str never
                for operation in operations.values():  # fails, and we would answer 400 anyway
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for model in request_models:
                model_schema = model.model_json_schema(ref_template=REF, mode="validation")
                schemas.update(model_schema.pop("$defs", {}))
                schemas[model.__name__] = model_schema
            if has_api_key:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    keyed = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
                    for operation in operations.values() if keyed else ():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
