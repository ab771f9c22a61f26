"""Logprobs in OpenAI's two layouts: /v1/completions' parallel lists (tokens, token_logprobs, top_logprobs,
text_offset) and /v1/chat/completions' per-token entries with UTF-8 bytes. Non-finite values (a token the
sampler masked) become -9999.0, as OpenAI's API never sends NaN or infinity in JSON. With `echo` the prompt's
tokens come first; the first has no logprob (null), as in OpenAI's legacy API and vLLM."""

from __future__ import annotations

from typing import Any

from longreach.model.tokenizer import NUM_BYTE_TOKENS, ByteTokenizer


def finite(x: float) -> float:
    return x if x == x and abs(x) != float("inf") else -9999.0


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


class LogprobFormatter:
    """Token texts and bytes from the server's tokenizer (token ids shown as `token_id:N` without one)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer) and token_id < NUM_BYTE_TOKENS:
            return [token_id]  # a byte of a multi-byte character: the byte itself
        return list(self.token_text(token_id).encode("utf-8"))

    def completion(
        self, token_ids: list[int], logprobs: list[dict[int, float] | None], k: int, text_offset: int
    ) -> dict[str, Any]:
        """An entry None (a prompt's first token) has null logprob and top_logprobs."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(text_offset)
            text_offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(finite(entry.get(token_id, float("-inf"))))
            top: dict[str, float] | None = None
            if k:
                top = {}
                for t, v in _top(entry, k):  # distinct ids may share a text: keep the likeliest
                    top.setdefault(self.token_text(t), finite(v))
            out["top_logprobs"].append(top)
        return out

    def chat(self, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> dict[str, Any]:
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            content.append(
                {
                    "token": self.token_text(token_id),
                    "logprob": finite(entry.get(token_id, float("-inf"))),
                    "bytes": self.token_bytes(token_id),
                    "top_logprobs": [
                        {"token": self.token_text(t), "logprob": finite(v), "bytes": self.token_bytes(t)}
                        for t, v in _top(entry, k)
                    ],
                }
            )
        return {"content": content}
