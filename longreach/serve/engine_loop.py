"""The bridge between asyncio request handlers and the (synchronous, single-caller) `LLMEngine`.

One background thread owns the engine: it runs the commands the handlers queued (add, abort), steps the
engine while it has work, and hands each request's news to that request's asyncio queue with
`loop.call_soon_threadsafe`. So every engine call is serialised in one thread, a long forward pass never
blocks the event loop, and the loop sleeps on an event when there is nothing to do (vLLM's AsyncLLM
pattern, minus the separate process).

Shutdown is two-phase: `drain(timeout)` stops admitting requests and aborts whatever is still running when
the timeout expires; `stop()` aborts everything at once and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from longreach.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from longreach.engine.llm import LLMEngine, RequestOutput
    from longreach.serve.metrics import ServerMetrics

logger = logging.getLogger("longreach.serve")


@dataclass(frozen=True)
class StreamItem:
    """What one engine step added to one request, copied in the engine thread (the engine mutates its own)."""

    text: str  # the whole text, on the last item only (copying it per step is O(n^2))
    delta_text: str
    delta_token_ids: list[int]
    delta_logprobs: list[dict[int, float]] | None
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    error: str | None = None  # set when the engine failed (a server bug, not bad input)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on a request's first item, if it asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class ServerClosedError(RuntimeError):
    """The engine no longer admits requests (the server is shutting down)."""


def _refuse(done: Future) -> None:
    if done.set_running_or_notify_cancel():
        done.set_exception(ServerClosedError("the server has stopped and accepts no new requests"))


class Sinks:
    """Where each request's news goes: its handler's asyncio queue, reached from the engine thread with
    `loop.call_soon_threadsafe` (engine thread only)."""

    def __init__(self, metrics: "ServerMetrics | None" = None):
        self.metrics = metrics
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, Any]] = {}

    def register(self, request_id: str, sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue, Any]) -> None:
        self._sinks[request_id] = sink

    def deliver(self, out: "RequestOutput") -> None:
        """Copy what a step added to a request into a StreamItem (the engine mutates its own) and send it."""
        if self.metrics is not None:
            self.metrics.record_output(out)
        sink = self._sinks.pop(out.request_id) if out.finished else self._sinks.get(out.request_id)
        if sink is None:
            return
        num_out, num_new = len(out.token_ids), len(out.delta_token_ids)
        logprobs = None if out.logprobs is None else list(out.logprobs[num_out - num_new : num_out])
        first = num_out == num_new
        prompt_logprobs = list(out.prompt_logprobs) if first and out.prompt_logprobs is not None else None
        item = StreamItem(
            out.text if out.finished else "",
            out.delta_text,
            list(out.delta_token_ids),
            logprobs,
            len(out.prompt_token_ids),
            num_out,
            out.finish_reason,
            prompt_logprobs=prompt_logprobs,
        )
        self._send(sink, item)

    def fail_all(self, message: str) -> None:
        """Every waiting handler gets the error (the engine failed: a server bug, not bad input)."""
        for sink in self._sinks.values():
            self._send(sink, StreamItem("", "", [], None, 0, 0, None, error=message))
        self._sinks.clear()

    @staticmethod
    def _send(sink, item: StreamItem) -> None:
        loop, queue, tag = sink
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (tag, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class EngineLoop:
    """Runs `engine` in a background thread; `add` and `abort` may be called from the event loop."""

    def __init__(self, engine: "LLMEngine", metrics: "ServerMetrics | None" = None):
        self.engine, self.metrics = engine, metrics
        self._commands: deque[tuple[Any, ...]] = deque()
        self._lock = threading.Lock()  # orders the last commands against the thread's exit
        self._is_closed = False
        self._wake = threading.Event()
        self._sinks = Sinks(metrics)  # engine thread only
        self._thread: threading.Thread | None = None
        self._is_accepting = True
        self._is_stopping = False
        self._abort_all_at: float | None = None  # time.monotonic() deadline set by drain()
        self.num_failures_in_a_row = 0  # engine failures since the last good step (health)

    # ------------------------------------------------------------ called from the event loop

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.metrics is not None:
            self.metrics.update_engine_state(self.engine)
        self._thread = threading.Thread(target=self._run, name="longreach-engine", daemon=True)
        self._thread.start()

    @property
    def is_accepting(self) -> bool:
        return self._is_accepting

    @property
    def is_healthy(self) -> bool:
        """The engine thread is alive and its last step did not fail."""
        return self._thread is not None and self._thread.is_alive() and self.num_failures_in_a_row == 0

    async def add(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        arrival_time: float,
        sink: asyncio.Queue,
        tag: Any = None,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request; its `(tag, StreamItem)` pairs arrive on `sink`. Raises the engine's ValueError for
        a request it refuses, ServerClosedError while shutting down. `cache_salt`: prefix-cache isolation
        (only requests with the same salt share cached blocks)."""
        if not self._is_accepting:
            raise ServerClosedError("the server is shutting down and accepts no new requests")
        if self._thread is None or not self._thread.is_alive():
            raise ServerClosedError("the engine is not running (the app's lifespan did not start it)")
        done: Future = Future()
        self._submit(
            (
                "add",
                prompt_token_ids,
                params,
                request_id,
                arrival_time,
                cache_salt,
                (asyncio.get_running_loop(), sink, tag),
                done,
            )
        )
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.abort(request_id)  # the handler went away while the add was in flight
            raise

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (no-op for unknown or finished ones); returns at once."""
        self._submit(("abort", request_id))

    def drain(self, timeout: float) -> None:
        """Refuse new requests; abort the ones still running after `timeout` seconds."""
        self._is_accepting = False
        self._submit(("drain", time.monotonic() + max(timeout, 0.0)))

    def stop(self, timeout: float = 30.0) -> None:
        """Abort every request, end the thread and wait for it."""
        self._is_accepting = False
        self._submit(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    def _submit(self, command: tuple[Any, ...]) -> None:
        with self._lock:
            if not self._is_closed:
                self._commands.append(command)
                self._wake.set()
                return
        if command[0] == "add":  # the thread has ended: nobody would ever answer
            _refuse(command[-1])

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._lock:
                self._is_closed = True
                pending, self._commands = list(self._commands), deque()
            for command in pending:
                if command[0] == "add":
                    _refuse(command[-1])

    def _loop(self) -> None:
        engine = self.engine
        while True:
            try:
                self._run_commands()
                if self._abort_all_at is not None and time.monotonic() >= self._abort_all_at:
                    self._abort_all()
                has_work = engine.has_unfinished_requests()
                if self._is_stopping and not has_work:
                    break
                if has_work:
                    self._step()
                if self.metrics is not None:
                    self.metrics.update_engine_state(engine)
            except Exception as exc:  # noqa: BLE001  (a bug: fail the requests, keep serving)
                logger.exception(
                    "engine loop failed; aborting the %d request(s) in flight", len(engine.requests)
                )
                self._fail_all(f"internal error in the engine: {type(exc).__name__}: {exc}")
                time.sleep(0.05)  # never spin if the failure repeats
                continue
            if not has_work:
                wait = None if self._abort_all_at is None else max(self._abort_all_at - time.monotonic(), 0.0)
                self._wake.wait(wait)
                self._wake.clear()

    def _run_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            kind = command[0]
            if kind == "add":
                _, ids, params, request_id, arrival_time, cache_salt, sink, done = command
                if self._is_stopping:
                    _refuse(done)
                    continue
                if not done.set_running_or_notify_cancel():
                    continue  # the handler gave up before the engine saw the request
                try:
                    self.engine.add_request(
                        ids, params, request_id=request_id, arrival_time=arrival_time, cache_salt=cache_salt
                    )
                except Exception as exc:  # noqa: BLE001  (handed to the handler, which answers 400)
                    done.set_exception(exc)
                    continue
                self._sinks.register(request_id, sink)
                done.set_result(None)
            elif kind == "abort":
                out = self.engine.abort(command[1])
                if out is not None:
                    self._sinks.deliver(out)
            elif kind == "drain":
                self._abort_all_at = command[1]
            elif kind == "stop":
                self._is_stopping = True
                self._abort_all()

    def _abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            out = self.engine.abort(request_id)
            if out is not None:
                self._sinks.deliver(out)

    def _step(self) -> None:
        outputs = self.engine.step()
        self.num_failures_in_a_row = 0
        for out in outputs:
            self._sinks.deliver(out)

    def _fail_all(self, message: str) -> None:
        self.num_failures_in_a_row += 1
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                logger.exception("could not abort request %s", request_id)
        self._sinks.fail_all(message)
