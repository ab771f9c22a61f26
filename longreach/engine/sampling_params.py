"""How one request is sampled and when it stops: vLLM's `SamplingParams` (names, defaults, validation)."""

from __future__ import annotations

from dataclasses import dataclass

_EPS = 1e-5  # temperatures below this are greedy


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops (vLLM's names and defaults)."""

    max_tokens: int | None = 16  # None: until max_model_len
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None  # None (or vLLM's 0 / -1): all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # k: return the sampled token's and the top-k tokens' logprobs
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = (
        None  # k: each prompt token's logprob given its prefix, and the top-k tokens
    )

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        if isinstance(self.stop, str):
            set_("stop", (self.stop,))
        set_("stop", tuple(self.stop or ()))
        set_("stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.top_k is not None and self.top_k in (0, -1):
            set_("top_k", None)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer or None")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(
                f"top_k={self.top_k!r} must be a positive integer, or None / 0 / -1 for no limit"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [-2, 2] (OpenAI's range)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r} must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs={self.logprobs!r} must be a non-negative integer or None")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or self.prompt_logprobs < 0
        ):
            raise ValueError(
                f"prompt_logprobs={self.prompt_logprobs!r} must be a non-negative integer or None"
            )
        if any(not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must not contain empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
