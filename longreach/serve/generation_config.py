"""`--generation-config`: the sampling defaults a request gets for the fields it leaves out (vLLM's rule).

    auto  (default) the checkpoint's generation_config.json: temperature, top_p, top_k, min_p,
          repetition_penalty and max_new_tokens apply when a request omits them (an omitted max_tokens
          then means max_new_tokens or the context left, whichever is smaller)
    vllm  our built-in defaults only (OpenAI's: temperature 1, top_p 1, no top_k, max_tokens 16 on
          /v1/completions, up to the context length on /v1/chat/completions)
    DIR   the generation_config.json in DIR instead of the checkpoint's; its max_new_tokens also caps
          the max_tokens a request gives (vLLM treats a generation-config folder as an override)

As in vLLM, only these keys are read (`do_sample` is not: a checkpoint that sets temperature 0.6 samples at
0.6 unless the request says otherwise). A value a request gives always wins, even when it equals our default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from longreach.serve import protocol as P

GENERATION_CONFIG = "generation_config.json"
# generation_config.json key -> request field (max_tokens: see `split_max_tokens`)
_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def split_max_tokens(defaults: dict[str, Any], choice: str) -> tuple[dict[str, Any], int | None, int | None]:
    """(the defaults a request's omitted fields take, the budget of a request without max_tokens, the cap
    on every budget), vLLM's `get_max_tokens`: the budget is the smallest of the request's max_tokens
    (else the generation config's max_new_tokens), the context left, and the cap (a DIR's max_new_tokens).

    An omitted max_tokens is filled with None ("up to the context"), which the server then bounds by the
    fallback, so a long prompt shortens the answer instead of being refused."""
    rest = dict(defaults)
    fallback = rest.pop("max_tokens", None)
    if fallback is not None:
        rest["max_tokens"] = None
    return rest, fallback, None if choice in ("auto", "vllm") else fallback


def load_generation_defaults(choice: str, model_dir: Path | None) -> tuple[dict[str, Any], Path | None]:
    """(request field -> default, the file they came from) for `--generation-config choice`.

    choice: 'auto' (model_dir's file; none is fine), 'vllm' (no defaults) or a directory holding
    generation_config.json (it must exist). Values are checked against the request schema's ranges."""
    if choice == "vllm":
        return {}, None
    if choice == "auto":
        if model_dir is None or not (Path(model_dir) / GENERATION_CONFIG).is_file():
            return {}, None
        path = Path(model_dir) / GENERATION_CONFIG
    else:
        directory = Path(choice)
        path = directory if directory.name == GENERATION_CONFIG else directory / GENERATION_CONFIG
        if not path.is_file():
            raise ValueError(
                f"--generation-config {choice!r}: no {GENERATION_CONFIG} there; give 'auto' (the "
                "checkpoint's), 'vllm' (built-in defaults) or a directory holding one"
            )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--generation-config: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--generation-config: {path} must hold a JSON object")
    defaults = {field: raw[key] for key, field in _KEYS.items() if raw.get(key) is not None}
    _check(defaults, path)
    return defaults, path


def _check(defaults: dict[str, Any], path: Path) -> None:
    """Each default within the range a request may give (the request schema's own checks)."""
    try:
        P.CompletionRequest.model_validate({"prompt": "x", **defaults})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(
            f"--generation-config: {path} has a value a request could not have ({problems})"
        ) from None


def apply_generation_defaults(request: BaseModel, defaults: dict[str, Any]) -> BaseModel:
    """`request` with each default filled into the fields it did not set (a copy; the original if none).
    max_tokens counts as set on a chat request that gives max_completion_tokens instead."""
    if not defaults:
        return request
    given = set(request.model_fields_set)
    if "max_completion_tokens" in given:
        given.add("max_tokens")
    update = {
        field: value
        for field, value in defaults.items()
        if field not in given and field in type(request).model_fields
    }
    return request.model_copy(update=update) if update else request
