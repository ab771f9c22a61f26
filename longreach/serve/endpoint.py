"""One runner for /v1/completions and /v1/chat/completions, streamed or not.

Both endpoints become a `Job`: prompts x n engine requests answering on one queue. The runner queues them all
(or none: an engine refusal is a 400, a shutdown a 503), then either collects every choice into one JSON body
or streams server-sent events as text arrives; a client that goes away has its requests aborted, which frees
their KV blocks. What differs between the endpoints is only the shape of the answer, a `ResponseFormat`:
object names, a finished choice, a streamed delta (with OpenAI's two logprob layouts) and chat's opening
role chunk. /v1/completions' `echo` puts each prompt (its text, its tokens and their logprobs) before its
choices, in the answer or in a stream's first chunk of each choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from longreach.engine.sampling_params import SamplingParams
from longreach.serve import protocol as P
from longreach.serve.engine_loop import EngineLoop, ServerClosedError, StreamItem
from longreach.serve.logprobs import LogprobFormatter
from longreach.serve.streams import Choice, EventStream, Group, sse, wait_for_disconnect


@dataclass(frozen=True)
class EchoPrompt:
    """The prompt one choice echoes; without `keep_output` (max_tokens 0) it is the whole answer."""

    text: str
    token_ids: list[int]
    keep_output: bool

    def join(self, text: str, ids: list[int], logprobs: list, prompt_logprobs: list | None):
        """(text, token ids, logprobs) of the prompt followed by the output's (if kept)."""
        if not self.keep_output:
            text, ids, logprobs = "", [], []
        prompt_logprobs = prompt_logprobs or [None] * len(self.token_ids)
        return self.text + text, self.token_ids + ids, prompt_logprobs + logprobs


@dataclass(frozen=True)
class Job:
    """One HTTP request's work: `params[i]` holds prompt i's n choices."""

    request_id: str
    model: str
    prompts: list[list[int]]
    params: list[list[SamplingParams]]
    logprobs_k: int | None  # None: no logprobs; k: the sampled token's and the top k
    stream: bool
    include_usage: bool  # stream_options.include_usage
    arrival_time: float
    cache_salt: str | None = None
    echo_texts: list[str] | None = None  # /v1/completions' echo: each prompt's text; None: no echo
    keep_output: bool = True  # False: echo with max_tokens 0 (one token is generated, then dropped)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    def echo_for(self, index: int) -> EchoPrompt | None:
        """What choice `index` (prompt-major, n per prompt) echoes; None without echo."""
        if self.echo_texts is None:
            return None
        prompt = index // len(self.params[0])
        return EchoPrompt(self.echo_texts[prompt], self.prompts[prompt], self.keep_output)


class CompletionFormat:
    """/v1/completions: `text` choices, logprobs as parallel lists with text offsets."""

    object = chunk_object = "text_completion"

    def __init__(self, logprobs: LogprobFormatter):
        self.logprobs = logprobs

    def choice(self, index: int, c: Choice, k: int | None, echo: EchoPrompt | None = None) -> dict[str, Any]:
        text, ids, logprobs, finish_reason = c.text, c.token_ids, c.logprobs, c.finish_reason
        if echo is not None:
            text, ids, logprobs = echo.join(text, ids, logprobs, c.prompt_logprobs)
            finish_reason = finish_reason if echo.keep_output else "length"
        lp = None if k is None else self.logprobs.completion(ids, logprobs, k, 0)
        return P.completion_choice(index, text, finish_reason, lp)

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def delta(
        self, index: int, item: StreamItem, k: int | None, text_offset: int, echo: EchoPrompt | None = None
    ) -> dict[str, Any] | None:
        """A streamed chunk; `echo` on a choice's first one."""
        text, ids, logprobs = item.delta_text, item.delta_token_ids, item.delta_logprobs or []
        finish_reason = item.finish_reason
        if echo is not None:
            text, ids, logprobs = echo.join(text, ids, logprobs, item.prompt_logprobs)
            finish_reason = finish_reason if echo.keep_output or finish_reason is None else "length"
        lp = None
        if k is not None and ids:
            lp = self.logprobs.completion(ids, logprobs, k, text_offset)
        if text or finish_reason or lp:
            return P.completion_choice(index, text, finish_reason, lp)
        return None


class ChatFormat(CompletionFormat):
    """/v1/chat/completions: `message` choices, streamed `delta`s after a role chunk, per-token logprobs."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, c: Choice, k: int | None, echo: EchoPrompt | None = None) -> dict[str, Any]:
        return P.chat_choice(  # (chat has no echo)
            index,
            c.text,
            c.finish_reason,
            None if k is None else self.logprobs.chat(c.token_ids, c.logprobs, k),
        )

    def opening(self, index: int) -> dict[str, Any] | None:
        return P.chat_chunk_choice(index, {"role": "assistant", "content": ""}, None, None)

    def delta(
        self, index: int, item: StreamItem, k: int | None, text_offset: int, echo: EchoPrompt | None = None
    ) -> dict[str, Any] | None:
        lp = None
        if k is not None and item.delta_token_ids:
            lp = self.logprobs.chat(item.delta_token_ids, item.delta_logprobs or [], k)
        if item.delta_text or item.finish_reason or lp:
            delta = {"content": item.delta_text} if item.delta_text or not item.finish_reason else {}
            return P.chat_chunk_choice(index, delta, item.finish_reason, lp)
        return None


class EndpointRunner:
    def __init__(self, engine_loop: EngineLoop):
        self.engine_loop = engine_loop

    async def run(self, request: Request, job: Job, fmt: CompletionFormat) -> Response:
        group = await self._start(job)
        created = P.now()
        if job.stream:
            return EventStream(self._events(group, job, fmt, created), group.abort_unfinished)
        choices = await self._collect(request, group)
        if choices is None:
            return Response(status_code=499)
        body = [fmt.choice(i, c, job.logprobs_k, job.echo_for(i)) for i, c in enumerate(choices)]
        num_output_tokens = sum(c.num_output_tokens for c in choices) if job.keep_output else 0
        usage = P.usage(job.num_prompt_tokens, num_output_tokens)
        return JSONResponse(P.response(fmt.object, job.request_id, created, job.model, body, usage))

    async def _start(self, job: Job) -> Group:
        """Queue every (prompt, choice) on the engine; all or none (refusals become 400, shutdown 503)."""
        group = Group(self.engine_loop, job.request_id)
        try:
            for ids, choice_params in zip(job.prompts, job.params):
                for p in choice_params:
                    index = len(group.engine_ids)
                    engine_id = f"{job.request_id}-{index}"
                    await self.engine_loop.add(
                        ids, p, engine_id, job.arrival_time, group.sink, tag=index, cache_salt=job.cache_salt
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

    async def _collect(self, request: Request, group: Group) -> list[Choice] | None:
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

    async def _events(
        self, group: Group, job: Job, fmt: CompletionFormat, created: int
    ) -> AsyncIterator[str]:
        def chunk(choices, usage=None) -> str:
            obj = P.response(
                fmt.chunk_object,
                job.request_id,
                created,
                job.model,
                choices,
                usage,
                with_usage_key=job.include_usage,
            )
            return sse(obj)

        num_choices = len(group.engine_ids)
        for index in range(num_choices):
            opening = fmt.opening(index)
            if opening is not None:
                yield chunk([opening])
        num_out, offsets, started = [0] * num_choices, [0] * num_choices, [False] * num_choices
        while not group.is_done:
            index, item = await group.next()
            if item.error is not None:
                yield sse(P.APIError(500, item.error, type="server_error").to_dict())
                group.abort_unfinished()
                break
            num_out[index] = item.num_output_tokens if job.keep_output else 0
            echo = None if started[index] else job.echo_for(index)
            started[index] = True
            delta = fmt.delta(index, item, job.logprobs_k, offsets[index], echo)
            offsets[index] += len(item.delta_text) + (0 if echo is None else len(echo.text))
            if delta is not None:
                yield chunk([delta])
        if job.include_usage:
            yield chunk([], P.usage(job.num_prompt_tokens, sum(num_out)))
        yield "data: [DONE]\n\n"
