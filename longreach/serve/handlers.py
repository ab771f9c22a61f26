"""Request handling of the OpenAI-compatible server: from an HTTP request to engine requests and back.

Bad input never reaches the engine as an exception: bodies are size-checked (413), parsed and validated by
`protocol` (400, naming the field), checked against `max_model_len` (400, naming both numbers), the
vocabulary and the per-request fan-out before the engine sees them; unknown models are 404 and a missing or
wrong bearer key is 401. One HTTP request becomes prompts x n engine requests answering on one queue; a
client that disconnects (streaming or not) has them aborted, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from longreach.engine.sampler import SamplingParams
from longreach.serve import protocol as P
from longreach.serve.engine_loop import EngineLoop, ServerClosedError
from longreach.serve.metrics import ServerMetrics
from longreach.serve.streams import Choice, EventStream, Group, sse, wait_for_disconnect

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
_MAX_DISCARD_BYTES = 64 * 2**20  # read (and drop) at most this much of an oversized body before answering 413
_TOKENIZE_IN_THREAD_CHARS = 16384  # longer prompts are tokenized off the event loop


def _in_vocab(ids: list[int], vocab: int, param: str) -> list[int]:
    """`ids`, or a 400 naming the first one outside [0, vocab)."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise P.APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
    return list(ids)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


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
                await self._discard(request)
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
                    await self._discard(request)
                    raise P.APIError(
                        413,
                        f"request body exceeds the limit of {limit} bytes (--max-request-bytes)",
                        code="request_too_large",
                    )
        except ClientDisconnect:
            raise P.APIError(400, "the client disconnected while sending the request body") from None
        return P.parse_request(bytes(body), cls)

    @staticmethod
    async def _discard(request: Request) -> None:
        """Read the rest of an oversized body (up to a bound) so the client sees our 413, not a reset."""
        seen = 0
        with contextlib.suppress(Exception):
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > _MAX_DISCARD_BYTES:
                    break

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
            return limit - num_prompt_tokens
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
        return max_tokens

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
        req: P._SamplingFields, max_tokens: int, logprobs: int | None, choice: int
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
            )
        except ValueError as exc:
            raise P.APIError(400, str(exc)) from None

    # ------------------------------------------------------------ running requests

    async def start(
        self,
        prompts: list[list[int]],
        params: list[list[SamplingParams]],
        request_id: str,
        arrival_time: float,
        cache_salt: str | None = None,
    ) -> Group:
        """Queue every (prompt, choice) on the engine; all or none (refusals become 400, shutdown 503)."""
        group = Group(self.engine_loop, request_id)
        try:
            for prompt_index, (ids, choice_params) in enumerate(zip(prompts, params)):
                for p in choice_params:
                    index = len(group.engine_ids)
                    engine_id = f"{request_id}-{index}"
                    await self.engine_loop.add(
                        ids, p, engine_id, arrival_time, group.sink, tag=index, cache_salt=cache_salt
                    )
                    group.engine_ids.append(engine_id)
        except BaseException as exc:
            group.abort_unfinished()
            if isinstance(exc, ServerClosedError):
                raise P.APIError(503, str(exc), type="server_error", code="shutting_down") from None
            if isinstance(exc, ValueError):
                raise P.APIError(400, str(exc)) from None
            raise
        return group

    async def collect(self, request: Request, group: Group) -> list[Choice] | None:
        """Wait for every choice; None (and the requests aborted) if the client disconnects first."""
        choices = [Choice() for _ in group.engine_ids]
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            while not group.is_done:
                getter = asyncio.ensure_future(group.next())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return None
                index, item = getter.result()
                choices[index].add(item)
        finally:
            watcher.cancel()
            group.abort_unfinished()
        for choice in choices:
            if choice.error is not None:
                raise P.APIError(500, choice.error, type="server_error")
            if choice.finish_reason == "abort":
                raise P.APIError(
                    503,
                    f"the server shut down before the request finished (it had generated "
                    f"{choice.num_output_tokens} tokens)",
                    type="server_error",
                    code="shutting_down",
                )
        return choices

    # ------------------------------------------------------------ logprobs in OpenAI's two formats

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        from longreach.model.tokenizer import NUM_BYTE_TOKENS, ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer) and token_id < NUM_BYTE_TOKENS:
            return [token_id]  # a byte of a multi-byte character: the byte itself
        return list(self.token_text(token_id).encode("utf-8"))

    @staticmethod
    def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[:k]

    def completion_logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]], k: int, text_offset: int
    ) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(entry.get(token_id, float("-inf"))))
            top: dict[str, float] | None = None
            if k:
                top = {}
                for t, v in self._top(entry, k):  # distinct ids may share a text: keep the likeliest
                    top.setdefault(self.token_text(t), _finite(v))
            out["top_logprobs"].append(top)
            out["text_offset"].append(text_offset)
            text_offset += len(text)
        return out

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> dict[str, Any]:
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            content.append(
                {
                    "token": self.token_text(token_id),
                    "logprob": _finite(entry.get(token_id, float("-inf"))),
                    "bytes": self.token_bytes(token_id),
                    "top_logprobs": [
                        {"token": self.token_text(t), "logprob": _finite(v), "bytes": self.token_bytes(t)}
                        for t, v in self._top(entry, k)
                    ],
                }
            )
        return {"content": content}

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
        budgets = [self.check_length(len(ids), req.max_tokens, "prompt") for ids in prompts]
        k = self.logprobs_k(req.logprobs)
        params = [[self.sampling_params(req, budget, k, i) for i in range(req.n)] for budget in budgets]
        request_id = P.new_id("cmpl")
        group = await self.start(prompts, params, request_id, arrival_time, req.cache_salt)
        num_prompt_tokens = sum(map(len, prompts))
        created = P.now()
        if req.stream:
            return EventStream(
                self._completion_events(
                    group, model, created, k, req.include_usage_in_stream, num_prompt_tokens
                ),
                group.abort_unfinished,
            )
        choices = await self.collect(request, group)
        if choices is None:
            return Response(status_code=499)
        body = [
            P.completion_choice(
                i,
                c.text,
                c.finish_reason,
                None if k is None else self.completion_logprobs(c.token_ids, c.logprobs, k, 0),
            )
            for i, c in enumerate(choices)
        ]
        return JSONResponse(
            P.response(
                "text_completion",
                request_id,
                created,
                model,
                body,
                P.usage(num_prompt_tokens, sum(c.num_output_tokens for c in choices)),
            )
        )

    async def _completion_events(
        self,
        group: Group,
        model: str,
        created: int,
        k: int | None,
        include_usage: bool,
        num_prompt_tokens: int,
    ) -> AsyncIterator[str]:
        num_out = [0] * len(group.engine_ids)
        offsets = [0] * len(group.engine_ids)
        while not group.is_done:
            index, item = await group.next()
            if item.error is not None:
                yield sse(P.APIError(500, item.error, type="server_error").to_dict())
                group.abort_unfinished()
                break
            num_out[index] = item.num_output_tokens
            logprobs = None
            if k is not None and item.delta_token_ids:
                logprobs = self.completion_logprobs(
                    item.delta_token_ids, item.delta_logprobs or [], k, offsets[index]
                )
            offsets[index] += len(item.delta_text)
            if item.delta_text or item.finish_reason or logprobs:
                choice = P.completion_choice(index, item.delta_text, item.finish_reason, logprobs)
                yield sse(
                    P.response(
                        "text_completion",
                        group.request_id,
                        created,
                        model,
                        [choice],
                        with_usage_key=include_usage,
                    )
                )
        if include_usage:
            yield sse(
                P.response(
                    "text_completion",
                    group.request_id,
                    created,
                    model,
                    [],
                    P.usage(num_prompt_tokens, sum(num_out)),
                )
            )
        yield "data: [DONE]\n\n"

    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request)
        self.check_accepting()
        req: P.ChatCompletionRequest = await self.read_request(request, P.ChatCompletionRequest)
        arrival_time = time.perf_counter()
        model = self.check_model(req.model)
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
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001  (the template runs on client data)
            raise P.APIError(
                400, f"messages: cannot apply the chat template: {exc}", param="messages"
            ) from None
        ids = await self.encode(text, "messages", chat=True)
        self.check_sampling(req, 1)
        budget = self.check_length(len(ids), req.requested_max_tokens, "messages")
        k = self.logprobs_k((req.top_logprobs or 0) if req.logprobs else None)
        params = [[self.sampling_params(req, budget, k, i) for i in range(req.n)]]
        request_id = P.new_id("chatcmpl")
        group = await self.start([ids], params, request_id, arrival_time, req.cache_salt)
        created = P.now()
        if req.stream:
            return EventStream(
                self._chat_events(group, model, created, k, req.include_usage_in_stream, len(ids)),
                group.abort_unfinished,
            )
        choices = await self.collect(request, group)
        if choices is None:
            return Response(status_code=499)
        body = [
            P.chat_choice(
                i,
                c.text,
                c.finish_reason,
                None if k is None else self.chat_logprobs(c.token_ids, c.logprobs, k),
            )
            for i, c in enumerate(choices)
        ]
        return JSONResponse(
            P.response(
                "chat.completion",
                request_id,
                created,
                model,
                body,
                P.usage(len(ids), sum(c.num_output_tokens for c in choices)),
            )
        )

    async def _chat_events(
        self,
        group: Group,
        model: str,
        created: int,
        k: int | None,
        include_usage: bool,
        num_prompt_tokens: int,
    ) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            return sse(
                P.response(
                    "chat.completion.chunk",
                    group.request_id,
                    created,
                    model,
                    choices,
                    usage,
                    with_usage_key=include_usage,
                )
            )

        for index in range(len(group.engine_ids)):
            yield chunk([P.chat_chunk_choice(index, {"role": "assistant", "content": ""}, None, None)])
        num_out = [0] * len(group.engine_ids)
        while not group.is_done:
            index, item = await group.next()
            if item.error is not None:
                yield sse(P.APIError(500, item.error, type="server_error").to_dict())
                group.abort_unfinished()
                break
            num_out[index] = item.num_output_tokens
            logprobs = None
            if k is not None and item.delta_token_ids:
                logprobs = self.chat_logprobs(item.delta_token_ids, item.delta_logprobs or [], k)
            if item.delta_text or item.finish_reason or logprobs:
                delta = {"content": item.delta_text} if item.delta_text or not item.finish_reason else {}
                yield chunk([P.chat_chunk_choice(index, delta, item.finish_reason, logprobs)])
        if include_usage:
            yield chunk([], P.usage(num_prompt_tokens, sum(num_out)))
        yield "data: [DONE]\n\n"

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [P.model_card(name, self.created, self.max_model_len) for name in self.model_names],
        }
