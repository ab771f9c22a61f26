"""The OpenAI-compatible endpoint backend of `longreach eval` (see `backends.py` for the protocol).

`EndpointBackend(url)` POSTs `/v1/completions` (temperature 0), or with `api="chat"` `/v1/chat/completions`
with each prompt as one user message (the server applies its own chat template), through a thread pool
(`concurrency`), with a per-request socket `timeout` and `retries` with exponential backoff on connection
errors, timeouts, HTTP 408/429 and 5xx; other HTTP errors are not retried. Prompts are sized with
`tokenizer` when given (the served model's tokenizer directory), else with `ApproxTokenizer` (about 20% off).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from longreach.eval.chat import chat_messages
from longreach.eval.tasks import Tokenizer


class ApproxTokenizer:
    """A stand-in token counter for endpoints whose tokenizer is not at hand: roughly one token per
    3-4 characters of English (pieces of up to 4 letters, 3 digits, or one other character), within
    about 20% of a Llama-style BPE tokenizer. Only the count is meaningful (the "ids" are piece lengths).
    Pass the real tokenizer whenever you have it."""

    _PIECE = re.compile(r"[A-Za-z]{1,4}|\d{1,3}|\S")

    def encode(self, text: str) -> list[int]:
        return [len(p) for p in self._PIECE.findall(text)]


class EndpointError(RuntimeError):
    """A request to the evaluation endpoint failed (the message says how)."""


# ---------------------------------------------------------------- OpenAI-compatible endpoint


ENDPOINT_APIS = {"completions": "/completions", "chat": "/chat/completions"}


def api_base(url: str) -> str:
    """'http://host:8000', '.../v1', '.../v1/completions' or '.../v1/chat/completions' -> '.../v1'."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint {url!r} must start with http:// or https://")
    url = url.rstrip("/")
    for route in ENDPOINT_APIS.values():
        if url.endswith("/v1" + route):
            return url[: -len(route)]
    return url if url.endswith("/v1") else url + "/v1"


def completions_url(url: str) -> str:
    """'http://host:8000', '.../v1' or '.../v1/completions' -> the /v1/completions URL."""
    return api_base(url) + ENDPOINT_APIS["completions"]


class EndpointBackend:
    """Greedy completions from an OpenAI-compatible server (ours, vLLM, a hosted API)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model_name: str | None = None,
        tokenizer: Tokenizer | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 2,
        backoff: float = 0.5,
        extra_body: dict | None = None,
        api: str = "completions",
    ):
        if api not in ENDPOINT_APIS:
            raise ValueError(f"api={api!r}: choose one of {list(ENDPOINT_APIS)}")
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        if retries < 0:
            raise ValueError(f"retries={retries} must be >= 0")
        self.api, self.base = api, api_base(url)
        self.url = self.base + ENDPOINT_APIS[api]
        self.api_key, self.concurrency, self.timeout, self.retries, self.backoff = (
            api_key,
            concurrency,
            timeout,
            retries,
            backoff,
        )
        self.extra_body = dict(extra_body or {})
        self.is_approximate_tokenizer = tokenizer is None
        self.tokenizer = tokenizer if tokenizer is not None else ApproxTokenizer()
        self.model_name = model_name or self._discover_model()
        self.name = self.model_name
        self.kind = "endpoint"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _discover_model(self) -> str:
        models_url = self.base + "/models"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(models_url, headers=self._headers()), timeout=min(self.timeout, 30.0)
            ) as response:
                data = json.loads(response.read())
            return str(data["data"][0]["id"])
        except Exception as exc:
            raise ValueError(
                f"could not list models at {models_url} ({type(exc).__name__}: {exc}); "
                "pass the served model's name (--model-name)"
            ) from None

    def _post(self, body: dict) -> str:
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=self._headers(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = response.read()
        try:
            choice = json.loads(payload)["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            if not isinstance(text, str):
                raise TypeError(f"the answer is {type(text).__name__}, not text")
            return text
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EndpointError(f"malformed response from {self.url}: {payload[:200]!r}") from exc

    def _complete_one(self, prompt: str, max_tokens: int) -> str | Exception:
        body = {
            "model": self.model_name,
            **({"messages": chat_messages(prompt)} if self.api == "chat" else {"prompt": prompt}),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **self.extra_body,
        }
        error: Exception = EndpointError("no attempt made")
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post(body)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", errors="replace")
                error = EndpointError(f"HTTP {exc.code} from {self.url}: {detail}")
                if exc.code not in (408, 429) and exc.code < 500:
                    return error  # the request itself is wrong: retrying cannot help
            except (TimeoutError, socket.timeout):
                error = EndpointError(f"no answer from {self.url} within {self.timeout:g} s")
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    error = EndpointError(f"no answer from {self.url} within {self.timeout:g} s")
                else:
                    error = EndpointError(f"cannot reach {self.url}: {exc.reason}")
            except (OSError, http.client.HTTPException) as exc:
                error = EndpointError(f"connection to {self.url} failed: {exc}")
            except EndpointError as exc:
                return exc
        if self.retries:
            error = EndpointError(f"{error} (after {self.retries + 1} attempts)")
        return error

    def complete(self, prompts: list[str], max_tokens: int) -> list[str | Exception]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(prompts), 1))) as pool:
            return list(pool.map(lambda p: self._complete_one(p, max_tokens), prompts))

    def close(self) -> None:
        pass
