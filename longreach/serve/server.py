"""OpenAI-compatible HTTP server over `LLMEngine`: the FastAPI app and uvicorn with a graceful drain.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream server-sent events ending in
`data: [DONE]` when `stream` is true), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics`,
and vLLM's `POST /tokenize`, `POST /detokenize`, `GET /version` (`tokenization`).
The request handling is in `handlers`, the engine thread in `engine_loop`; every error, including unknown
routes and methods, is answered in OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from longreach.serve import openapi as O
from longreach.serve import protocol as P
from longreach.serve import tokenization as T
from longreach.serve.handlers import DEFAULT_MAX_REQUEST_BYTES, OpenAIServer

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "OpenAIServer", "Server", "create_app"]

logger = logging.getLogger("longreach.serve")


def create_app(
    engine,
    model_name: str | list[str],
    *,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The FastAPI app serving `engine` (an `LLMEngine`) under `model_name` (or several names).

    The engine thread starts with the app (lifespan) and stops with it; `app.state.server` is the
    `OpenAIServer`, `app.state.engine_loop` its `EngineLoop` (used by `Server` to drain on shutdown)."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    if not names:
        raise ValueError("model_name: at least one served model name is needed")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes={max_request_bytes} must be positive")
    server = OpenAIServer(engine, names, api_key, max_request_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine_loop.stop)

    app = FastAPI(title="longreach", summary="OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server
    app.state.engine_loop = server.engine_loop
    _add_error_handlers(app)
    _add_routes(app, server)
    O.install(
        app,
        [P.CompletionRequest, P.ChatCompletionRequest, T.TokenizeRequest, T.DetokenizeRequest],
        has_api_key=api_key is not None,
    )
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, Starlette's (unknown route, wrong method) and bugs (500)."""

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, exc: P.APIError):
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(
            P.APIError(exc.status_code, message).to_dict(),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            P.APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").to_dict(),
            status_code=500,
        )


def _add_routes(app: FastAPI, server: OpenAIServer) -> None:
    """The endpoints; what each takes and answers is declared for the OpenAPI schema (`openapi`)."""

    @app.get("/health", responses=O.HEALTH_RESPONSES)
    async def health():
        """Readiness probe (no API key needed)."""
        if not server.engine_loop.is_accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not server.engine_loop.is_healthy:
            return JSONResponse({"status": "engine failing"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses=O.METRICS_RESPONSES)
    async def metrics():
        """Prometheus metrics (no API key needed)."""
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=O.responses(O.ModelList, 401))
    async def models(request: Request):
        """The served model names."""
        server.authorize(request)
        return server.models()

    @app.get("/v1/models/{model_id:path}", responses=O.responses(O.ModelCard, 401, 404))
    async def model(request: Request, model_id: str):
        """One served model."""
        server.authorize(request)
        name = server.check_model(model_id)
        return P.model_card(name, server.created, server.max_model_len)

    @app.post(
        "/v1/completions",
        openapi_extra=O.json_body(P.CompletionRequest),
        responses=O.responses(O.CompletionResponse, 400, 401, 404, 413, 503, stream=True),
    )
    async def completions(request: Request):
        """OpenAI's Completions API (streams server-sent events when `stream` is true)."""
        return await server.completions(request)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=O.json_body(P.ChatCompletionRequest),
        responses=O.responses(O.ChatCompletionResponse, 400, 401, 404, 413, 503, stream=True),
    )
    async def chat_completions(request: Request):
        """OpenAI's Chat Completions API (streams server-sent events when `stream` is true)."""
        return await server.chat_completions(request)

    _add_tokenizer_routes(app, server)


def _add_tokenizer_routes(app: FastAPI, server: OpenAIServer) -> None:
    """vLLM's /tokenize, /detokenize and /version."""

    @app.post(
        "/tokenize",
        openapi_extra=O.json_body(T.TokenizeRequest),
        responses=O.responses(O.TokenizeResponse, 400, 401, 404, 413),
    )
    async def tokenize(request: Request):
        """A prompt, or chat messages through the chat template, as the model's token ids."""
        return await T.tokenize(server, request)

    @app.post(
        "/detokenize",
        openapi_extra=O.json_body(T.DetokenizeRequest),
        responses=O.responses(O.DetokenizeResponse, 400, 401, 404, 413),
    )
    async def detokenize(request: Request):
        """Token ids as text (special tokens shown)."""
        return await T.detokenize(server, request)

    @app.get("/version", responses=O.responses(O.Version))
    async def version():
        """The server's longreach version (no API key needed)."""
        return T.version()


class Server(uvicorn.Server):
    """uvicorn's server with a graceful drain. On SIGTERM / SIGINT (or `should_exit`) it stops accepting
    connections, lets in-flight requests run for `shutdown_timeout` seconds, aborts what is left (streams end
    with finish_reason "abort"), stops the engine thread and returns, so the process exits 0. (Plain uvicorn
    re-raises the signal after its shutdown, which would end the process with 143.)"""

    def __init__(
        self,
        config: uvicorn.Config,
        shutdown_timeout: float = 30.0,
        on_started: Callable[[Server], None] | None = None,
    ):
        # uvicorn's own timeout is the backstop, should a handler ignore the aborts
        config.timeout_graceful_shutdown = shutdown_timeout + 10.0
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.on_started = on_started

    @property
    def bound_port(self) -> int | None:
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                return sock.getsockname()[1]
        return None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started(self)

    async def shutdown(self, sockets=None) -> None:
        app = self.config.app
        engine_loop = getattr(getattr(app, "state", None), "engine_loop", None)
        if engine_loop is not None:
            engine_loop.drain(self.shutdown_timeout)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
