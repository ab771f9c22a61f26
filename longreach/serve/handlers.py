"""Request handling of the OpenAI-compatible server: from an HTTP request to a checked `endpoint.Job`.

Bad input never reaches the engine as an exception: bodies are size-checked (413), parsed and validated by
`protocol` (400, naming the field), checked against `max_model_len` (400, naming both numbers), the
vocabulary and the per-request fan-out before the engine sees them; unknown models are 404 and a missing or
wrong bearer key is 401. Running the job (engine requests, streaming or not, disconnects) is `endpoint.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from longreach.engine.sampling_params import SamplingParams
from longreach.serve import protocol as P
from longreach.serve.endpoint import ChatFormat, CompletionFormat, EndpointRunner, Job
from longreach.serve.engine_loop import EngineLoop
from longreach.serve.generation_config import apply_generation_defaults
from longreach.serve.logprobs import LogprobFormatter
from longreach.serve.metrics import ServerMetrics

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
_MAX_DISCARD_BYTES = 64 * 2**20  # read (and drop) at most this much of an oversized body before answering 413
_TOKENIZE_IN_THREAD_CHARS = 16384  # longer prompts are tokenized off the event loop


def _in_vocab(ids: list[int], vocab: int, param: str) -> list[int]:
    """`ids`, or a 400 naming the first one outside [0, vocab)."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise P.APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
    return list(ids)


def _echo_text(tokenizer, prompt: str | list[int], ids: list[int]) -> str:
    """The text echo puts first: a text prompt as sent, token ids decoded (special tokens shown)."""
    if isinstance(prompt, str):
        return prompt
    return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=False)


async def _discard(request: Request) -> None:
    """Read the rest of an oversized body (up to a bound) so the client sees our 413, not a reset."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > _MAX_DISCARD_BYTES:
                break


class OpenAIServer:
    """The request handling behind the routes; one per app."""

    def __init__(self, engine, model_names: list[str], api_key: str | None, max_request_bytes: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_names = model_names
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.max_model_len = engine.scheduler_config.max_model_len
        self.created = P.now()
        self.metrics = ServerMetrics(engine.num_kv_blocks)
        self.engine_loop = EngineLoop(engine, self.metrics)
        self.runner = EndpointRunner(self.engine_loop)
        logprobs = LogprobFormatter(self.tokenizer)
        self.completion_format, self.chat_format = CompletionFormat(logprobs), ChatFormat(logprobs)
        self.generation_defaults: dict[str, Any] = {}  # --generation-config: for the fields a request omits
        self.max_tokens_cap: int | None = None  # --generation-config DIR's max_new_tokens: caps every budget
        self.max_tokens_fallback: int | None = None  # its max_new_tokens: the budget without max_tokens

    # ------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise P.APIError(
                401,
                "no API key provided: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise P.APIError(401, "incorrect API key provided", code="invalid_api_key")

    def check_accepting(self) -> None:
        if not self.engine_loop.is_accepting:
            raise P.APIError(
                503,
                "the server is shutting down and accepts no new requests",
                type="server_error",
                code="shutting_down",
            )

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        raise P.APIError(
            404,
            f"the model {name!r} does not exist; this server serves {', '.join(map(repr, self.model_names))}",
            param="model",
            code="model_not_found",
        )

    async def read_request(self, request: Request, cls: type[BaseModel]) -> BaseModel:
        """Body -> validated request: 413 over the size limit, 400 for anything malformed."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise P.APIError(400, f"Content-Length {declared!r} is not a number of bytes")
            if int(declared) > limit:
                await _discard(request)
                raise P.APIError(
                    413,
                    f"request body is {int(declared)} bytes; the limit is {limit} bytes "
                    "(--max-request-bytes)",
                    code="request_too_large",
                )
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    await _discard(request)
                    raise P.APIError(
                        413,
                        f"request body exceeds the limit of {limit} bytes (--max-request-bytes)",
                        code="request_too_large",
                    )
        except ClientDisconnect:
            raise P.APIError(400, "the client disconnected while sending the request body") from None
        return apply_generation_defaults(P.parse_request(bytes(body), cls), self.generation_defaults)

    async def encode(self, text: str, param: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise P.APIError(
                400,
                f"{param}: this model has no tokenizer, so text is not accepted; send token ids",
                param=param,
            )
        try:
            if len(text) > _TOKENIZE_IN_THREAD_CHARS:
                ids = await asyncio.to_thread(self._encode, text, chat)
            else:
                ids = self._encode(text, chat)
        except (UnicodeError, ValueError) as exc:
            raise P.APIError(400, f"{param}: cannot be tokenized ({exc})", param=param) from None
        return list(ids)

    def _encode(self, text: str, chat: bool) -> list[int]:
        # a chat template writes its own special tokens (transformers tokenizes it with add_special_tokens=False)
        return self.tokenizer.encode(text, add_bos=False) if chat else self.tokenizer.encode(text)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """The completion budget; 400 naming both numbers when prompt + max_tokens exceeds max_model_len."""
        limit = self.max_model_len
        if num_prompt_tokens == 0:
            raise P.APIError(400, f"{param}: is empty; at least one token is needed", param=param)
        if max_tokens is None:
            if num_prompt_tokens >= limit:
                raise P.APIError(
                    400,
                    f"this model's maximum context length is {limit} tokens, but the prompt has "
                    f"{num_prompt_tokens} tokens, leaving no room for a completion; shorten it",
                    param=param,
                    code="context_length_exceeded",
                )
            return min(
                limit - num_prompt_tokens, self.max_tokens_fallback or limit, self.max_tokens_cap or limit
            )
        if num_prompt_tokens + max_tokens > limit:
            raise P.APIError(
                400,
                f"this model's maximum context length is {limit} tokens, but "
                f"{num_prompt_tokens + max_tokens} were requested: {num_prompt_tokens} in the "
                f"prompt + max_tokens={max_tokens} for the completion; shorten the prompt or "
                "lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return min(max_tokens, self.max_tokens_cap or max_tokens)

    def check_sampling(self, req: P._SamplingFields, num_prompts: int) -> None:
        """What the schema cannot know: the vocabulary size and the per-request fan-out."""
        _in_vocab(req.stop_token_ids or [], self.engine.model.config.vocab_size, "stop_token_ids")
        if num_prompts * req.n > P.MAX_CHOICES:
            raise P.APIError(
                400,
                f"n: {num_prompts} prompts x n={req.n} = {num_prompts * req.n} completions; at "
                f"most {P.MAX_CHOICES} per request",
                param="n",
            )

    def logprobs_k(self, k: int | None) -> int | None:
        return None if k is None else min(k, self.engine.model.config.vocab_size)

    @staticmethod
    def sampling_params(
        req: P._SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        choice: int,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        seed = (
            None if req.seed is None else (req.seed + choice) % 2**64
        )  # n seeded choices differ, reproducibly
        stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                seed=seed,
                stop=tuple(stop),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except ValueError as exc:
            raise P.APIError(400, str(exc)) from None

    # ------------------------------------------------------------ endpoints

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        self.check_accepting()
        req: P.CompletionRequest = await self.read_request(request, P.CompletionRequest)
        arrival_time = time.perf_counter()
        model = self.check_model(req.model)
        batch = req.prompts()
        self.check_sampling(req, len(batch))
        prompts = []
        for index, prompt in enumerate(batch):
            param = "prompt" if len(batch) == 1 else f"prompt.{index}"
            # token ids are checked before any prompt is queued: an engine refusal would roll back the others
            prompts.append(
                await self.encode(prompt, param)
                if isinstance(prompt, str)
                else _in_vocab(prompt, self.engine.model.config.vocab_size, param)
            )
        # echo with max_tokens 0 answers the prompt alone: one token is generated and dropped (as vLLM does)
        keep_output = req.max_tokens != 0
        budgets = [
            self.check_length(len(ids), req.max_tokens if keep_output else 1, "prompt") for ids in prompts
        ]
        k = self.logprobs_k(req.logprobs)
        prompt_k = k if req.echo else None  # echo + logprobs: the prompt tokens' logprobs come first
        params = [
            [self.sampling_params(req, budget, k, i, prompt_k) for i in range(req.n)] for budget in budgets
        ]
        echo_texts = (
            [_echo_text(self.tokenizer, p, ids) for p, ids in zip(batch, prompts)] if req.echo else None
        )
        job = Job(P.new_id("cmpl"), model, prompts, params, k, req.stream, req.include_usage_in_stream,
                  arrival_time, req.cache_salt, echo_texts, keep_output)  # fmt: skip
        return await self.runner.run(request, job, self.completion_format)

    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request)
        self.check_accepting()
        req: P.ChatCompletionRequest = await self.read_request(request, P.ChatCompletionRequest)
        arrival_time = time.perf_counter()
        model = self.check_model(req.model)
        ids = await self.encode(self._chat_prompt(req), "messages", chat=True)
        self.check_sampling(req, 1)
        budget = self.check_length(len(ids), req.requested_max_tokens, "messages")
        k = self.logprobs_k((req.top_logprobs or 0) if req.logprobs else None)
        params = [[self.sampling_params(req, budget, k, i) for i in range(req.n)]]
        job = Job(P.new_id("chatcmpl"), model, [ids], params, k, req.stream, req.include_usage_in_stream,
                  arrival_time, req.cache_salt)  # fmt: skip
        return await self.runner.run(request, job, self.chat_format)

    def _chat_prompt(self, req: P.ChatCompletionRequest, add_generation_prompt: bool = True) -> str:
        """The messages through the tokenizer's chat template (400 when there is none or it fails)."""
        if self.tokenizer is None:
            raise P.APIError(
                400,
                "messages: this model has no tokenizer, so it has no chat template; "
                "use /v1/completions with token ids",
                param="messages",
            )
        try:
            messages = [m.to_template_dict() for m in req.messages]
        except ValueError as exc:
            raise P.APIError(400, str(exc), param="messages") from None
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001  (the template runs on client data)
            raise P.APIError(
                400, f"messages: cannot apply the chat template: {exc}", param="messages"
            ) from None

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [P.model_card(name, self.created, self.max_model_len) for name in self.model_names],
        }
