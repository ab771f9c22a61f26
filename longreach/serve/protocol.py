"""OpenAI request and response shapes (the Completions and Chat Completions APIs), as pydantic models.

Requests are validated strictly (a string where a number belongs is an error, not coerced; only an integral
number such as `16.0` counts as an integer, as JSON Schema has it), unknown fields are ignored as OpenAI's own
server does, and vLLM's sampling extensions (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`min_tokens`, `stop_token_ids`) are accepted. The models' JSON schemas are the server's documented request
bodies (`openapi`); where a validator checks what a type cannot say, the schema states it too (`minItems`,
`enum`, ...). Responses are plain dicts built by the helpers at the bottom, in the field order OpenAI returns them.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

MAX_N = 128  # choices per prompt
MAX_CHOICES = 1024  # completions per request (prompts x n)
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI: 5 for completions, 20 for chat)
MAX_STOP = 64  # stop strings (OpenAI: 4); each is searched for after every token of every choice
MAX_STOP_TOKEN_IDS = 1024  # likewise


class APIError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str) -> str:
    """`text` with lone surrogates (legal in JSON's \\u escapes, not in UTF-8) written as `\\udxxx`: an error that
    quotes the client's input must still encode, or the client would get a 500 instead of its 400."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_from_validation(exc: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field (`param`) and what it accepts."""
    err = exc.errors(include_url=False)[0]
    path = [str(p) for p in err["loc"] if isinstance(p, int) or not _is_union_tag(p)]
    param = ".".join(path) or None
    message = err["msg"].removeprefix("Value error, ")
    if param is None:  # a whole-request check: its message starts with the field's name
        named = re.match(r"([a-z_]+): ", message)
        param = named.group(1) if named else None
    if err["type"] == "missing":
        message = f"'{param}' is a required property"
    elif param and not message.startswith(param.split(".")[-1]):
        got = err.get("input")
        message = f"{param}: {message}" + (
            f" (got {_short(got)})" if got is not None and not isinstance(got, dict) else ""
        )
    return APIError(
        400, message, param=param, code="invalid_value" if err["type"] != "missing" else "missing"
    )


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried ("list[int]", "str", ...) inside `loc`; not a field
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none")
        or "[" in part
        or part.startswith(("function-", "nullable"))
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _json_number(text: str) -> float | int:
    """A JSON number written with a fraction or exponent; integral ones (`2.0`, `1e3`) are integers, as JSON
    Schema counts them, so `"max_tokens": 16.0` is accepted (and `"max_tokens": 16.5` is not)."""
    value = float(text)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{text} overflows a 64-bit float (numbers must be finite)")
    return int(value) if value.is_integer() else value


def parse_request(body: bytes, cls: type[BaseModel]) -> BaseModel:
    """A request body -> a validated `cls`; APIError(400) when it is not UTF-8, not JSON (NaN and overflowing
    numbers included), not an object, or breaks the schema."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"request body is not valid UTF-8 (bad byte at offset {exc.start})", code="invalid_json"
        ) from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_json_number)
    except (ValueError, RecursionError) as exc:
        reason = (
            "nested too deeply"
            if isinstance(exc, RecursionError)
            else "a number has too many digits"
            if "integer string conversion" in str(exc)
            else str(exc)
        )
        raise APIError(400, f"request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(
            400, f"request body must be a JSON object, got {type(obj).__name__}", code="invalid_json"
        )
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise error_from_validation(exc) from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


_STOP_SCHEMA = {
    "description": "up to the first of these strings, which is left out",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}},
        {"type": "null"},
    ],
}


class _SamplingFields(_Request):
    """Fields shared by both endpoints; ranges as OpenAI documents them (top_k/min_p/... as vLLM)."""

    model: str | None = Field(None, description="a served model name (GET /v1/models); absent: the first one")
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="vLLM's; -1, 0 or absent: no limit")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM's")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM's; 1 disables it")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="choice i of n uses seed + i")
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    stop_token_ids: list[int] | None = Field(
        None,
        max_length=MAX_STOP_TOKEN_IDS,
        description="vLLM's; ids in [0, vocabulary size)",
        json_schema_extra={"items": {"type": "integer", "minimum": 0}},
    )
    ignore_eos: bool = Field(False, description="vLLM's")
    min_tokens: int = Field(0, ge=0, le=2**31 - 1, description="vLLM's; at most max_tokens")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="not supported: absent or empty", json_schema_extra={"maxProperties": 0}
    )
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description=("vLLM's: only requests with the same salt share cached prompt prefixes"),
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError(f"stop: stop strings must not be empty (got {_short(stop)})")
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings (got {len(stops)})")
        return stop

    @model_validator(mode="after")
    def _check_common(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        return self

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT_SCHEMA = {
    "description": "one prompt (text or token ids) or a batch of them",
    "anyOf": [_TEXT, _TOKEN_IDS, {"type": "array", "minItems": 1, "items": {"anyOf": [_TEXT, _TOKEN_IDS]}}],
}


# request examples: shown by /docs, and the first bodies a schema fuzzer sends (short, so they fit any context)
_COMPLETION_EXAMPLES = [
    {"prompt": "The pass key is", "max_tokens": 8, "temperature": 0},
    {
        "prompt": ["The grass is", "The sky is"],
        "n": 2,
        "max_tokens": 24,
        "seed": 1,
        "logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
]
_CHAT_EXAMPLES = [
    {"messages": [{"role": "user", "content": "What is the pass key?"}], "max_tokens": 16},
    {
        "messages": [{"role": "user", "content": "Hi"}],
        "n": 2,
        "max_tokens": 24,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
    },
]


class CompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": _COMPLETION_EXAMPLES})
    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)]  # checked by _check_prompt, for its messages
    max_tokens: int | None = Field(
        16, ge=0, description="0 only with echo: the prompt (and its logprobs) alone"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = Field(
        False, description="the prompt before the completion (with logprobs: theirs first)"
    )
    best_of: int | None = Field(None, description="absent or equal to n")
    suffix: str | None = Field(
        None, description="not supported: absent or empty", json_schema_extra={"maxLength": 0}
    )

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt):
        """One prompt or a batch: a string, a list of strings, token ids, or a list of token-id lists."""

        def is_ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        ok = (
            isinstance(prompt, str)
            or is_ids(prompt)
            or (isinstance(prompt, list) and all(isinstance(p, str) or (is_ids(p) and p) for p in prompt))
        )
        if not ok:
            raise ValueError(
                f"prompt: must be a string, a list of strings, a list of token ids or a list of "
                f"token-id lists (got {_short(prompt)})"
            )
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt: must not be an empty list")
        return prompt

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (it returns the prompt alone)")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(
                f"best_of: only best_of = n is supported (got best_of={self.best_of}, n={self.n})"
            )
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str = Field(json_schema_extra={"enum": ["text"]})  # others: a 400 naming the type
    text: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str = Field(
        description="the roles the model's chat template accepts (these three for most)",
        json_schema_extra={"enum": ["system", "user", "assistant"]},
    )
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The message as a chat template reads it: content flattened to one string of its text parts."""
        content = self.content
        if isinstance(content, list):
            bad = [part.type for part in content if part.type != "text"]
            if bad:
                raise ValueError(
                    f"messages: content part type {bad[0]!r} is not supported; only 'text' parts are"
                )
            content = "".join(part.text or "" for part in content)
        out = {"role": self.role, "content": content if content is not None else ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": _CHAT_EXAMPLES})
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_tokens: int | None = Field(None, ge=1, description="absent: up to the model's context length")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs true")
    tools: list[dict[str, Any]] | None = Field(
        None, description="not supported: absent or empty", json_schema_extra={"maxItems": 0}
    )
    tool_choice: Any = None
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')

    @model_validator(mode="after")
    def _check_chat(self):
        if not self.messages:
            raise ValueError("messages: must contain at least one message")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError(f"response_format: only type 'text' is supported (got {self.response_format!r})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def model_card(name: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "longreach",
        "root": name,
        "max_model_len": max_model_len,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_chunk_choice(
    index: int, delta: dict[str, Any], finish_reason: str | None, logprobs: dict | None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def response(
    object_: str,
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None = None,
    with_usage_key: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": request_id,
        "object": object_,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage_key:
        out["usage"] = usage_
    return out
