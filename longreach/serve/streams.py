"""Streaming plumbing of the server: one HTTP request's engine requests on one queue, the choices being
collected for a non-streamed answer, and server-sent events that abort their requests however they end
(finished, client gone, server cancelled). The OpenAI semantics live in `handlers`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from longreach.serve.engine_loop import EngineLoop, StreamItem


class Choice:
    """A choice being collected for a non-streaming response."""

    def __init__(self):
        self.text, self.token_ids, self.logprobs = "", [], []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.num_output_tokens = 0
        self.prompt_logprobs: list[dict[int, float] | None] | None = None  # SamplingParams.prompt_logprobs

    def add(self, item: StreamItem) -> None:
        if item.finished and item.error is None:
            self.text = item.text
        if item.prompt_logprobs is not None:
            self.prompt_logprobs = item.prompt_logprobs
        self.token_ids += item.delta_token_ids
        self.logprobs += item.delta_logprobs or []
        self.finish_reason, self.error = item.finish_reason, item.error
        self.num_output_tokens = max(self.num_output_tokens, item.num_output_tokens)


class Group:
    """The engine requests of one HTTP request (prompts x n choices), all answering on one queue."""

    def __init__(self, engine_loop: EngineLoop, request_id: str):
        self.engine_loop, self.request_id = engine_loop, request_id
        self.sink: asyncio.Queue = asyncio.Queue()
        self.engine_ids: list[str] = []
        self.finished: set[int] = set()

    def abort_unfinished(self) -> None:
        for index, engine_id in enumerate(self.engine_ids):
            if index not in self.finished:
                self.engine_loop.abort(engine_id)
        self.finished.update(range(len(self.engine_ids)))

    async def next(self) -> tuple[int, StreamItem]:
        index, item = await self.sink.get()
        if item.finished:
            self.finished.add(index)
        return index, item

    @property
    def is_done(self) -> bool:
        return len(self.finished) == len(self.engine_ids)


class EventStream(StreamingResponse):
    """Server-sent events that watch for the client going away whatever the ASGI version, and call
    `on_close` however the stream ends (finished, client gone, server cancelled), so requests get aborted."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            with contextlib.suppress(OSError):
                await self.stream_response(send)

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self.on_close()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(results[0], Exception):  # a bug while streaming: let uvicorn log it
            raise results[0]


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
