"""From sampled tokens to what callers see: stop conditions, incremental detokenization, stop strings and
finish reasons, in one place (vLLM v1's OutputProcessor and detokenizer; nano-vllm keeps it in its engine).

After every step the engine hands over the requests that got a token. For each, `OutputProcessor`:
1. checks the token stops: EOS (unless ignore_eos), a stop token id, max_tokens, max_model_len, each only
   once `min_tokens` are out (but length limits always);
2. decodes the new text incrementally (a token alone can lose a leading space or split a UTF-8 character);
3. searches the new text for stop strings (a stop string wins over a token stop on the same token: its text
   is cut there);
4. if the request finished, writes `finish_reason` / `stop_reason` (this module alone writes them) and has
   the scheduler release it;
5. returns a `RequestOutput` whose text holds back the last characters that could still start a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from longreach.engine.sequence import RequestMetrics, Sequence


@dataclass
class RequestOutput:
    """A request's state after a step; `finished` once `finish_reason` is set ("stop", "length" or "abort").

    `text` / `token_ids` are cumulative; `delta_text` / `delta_token_ids` are what this step added (for
    streaming). `out.outputs[0].text` also works, as in vLLM."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list[dict[int, float]] | None
    metrics: RequestMetrics
    # SamplingParams.prompt_logprobs: one entry per prompt token ({token id: logprob} of that token and the top
    # k), None for the first; set by the engine from the request's first token on
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outputs(self) -> list["RequestOutput"]:
        return [self]


def detokenize_incrementally(tokenizer, ids: list[int], prefix_offset: int, read_offset: int):
    """New text of ids[read_offset:] given a few tokens of context (vLLM's trick): decoding a token alone
    can lose a leading space or split a UTF-8 character, so decode prefix..end and subtract prefix..read.
    Returns (new_text, prefix_offset, read_offset); text ending in U+FFFD waits for the next token."""
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset])
    full_text = tokenizer.decode(ids[prefix_offset:])
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        return full_text[len(prefix_text) :], read_offset, len(ids)
    return "", prefix_offset, read_offset


@dataclass
class _TextState:
    """One request's output text and what of it (and of its ids) was already reported."""

    text: str = ""
    prefix_offset: int = 0  # incremental-detokenizer offsets into the output ids
    read_offset: int = 0
    num_reported_tokens: int = 0
    num_reported_chars: int = 0
    stop_strings: tuple[str, ...] = field(default=())


class OutputProcessor:
    """Stops, text and finish reasons for every request of one engine.

    release: called with a request when it finishes (the scheduler frees its blocks and drops it)."""

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: Iterable[int],
        max_model_len: int,
        release: Callable[[Sequence], None],
    ):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.release = release
        self._texts: dict[str, _TextState] = {}

    def add(self, seq: Sequence) -> None:
        self._texts[seq.request_id] = _TextState(stop_strings=tuple(seq.sampling_params.stop or ()))

    def process(self, seqs: Iterable[Sequence]) -> list[RequestOutput]:
        """Outputs of requests that just got one token each (in order)."""
        outputs = []
        for seq in seqs:
            reason, stop_reason = self._token_stop(seq, seq.token_ids[-1])
            state = self._texts[seq.request_id]
            if self.tokenizer is not None:
                reason, stop_reason = self._extend_text(seq, state, reason, stop_reason)
            if reason is not None:
                self._finish(seq, reason, stop_reason)
            outputs.append(self._output(seq, state))
        return outputs

    def abort(self, seq: Sequence) -> RequestOutput:
        """End a request now (a client went away): finish reason "abort"."""
        state = self._texts.get(seq.request_id) or _TextState()  # already gone if it had finished
        self._finish(seq, "abort", None)
        return self._output(seq, state)

    def _token_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        p = seq.sampling_params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _extend_text(
        self, seq: Sequence, state: _TextState, reason: str | None, stop_reason: int | str | None
    ) -> tuple[str | None, int | str | None]:
        """Append the new token's text; a stop string found in it ends the request (and cuts the text)."""
        ids = seq.output_token_ids
        if reason == "stop" and stop_reason is None:
            ids = ids[:-1]  # EOS is not part of the text
        new, state.prefix_offset, state.read_offset = detokenize_incrementally(
            self.tokenizer, ids, state.prefix_offset, state.read_offset
        )
        old_len = len(state.text)
        state.text += new
        if state.stop_strings:
            start = max(0, old_len - max(map(len, state.stop_strings)) + 1)
            hits = [(i, s) for i, s in ((state.text.find(s, start), s) for s in state.stop_strings) if i >= 0]
            if hits:
                index, stop = min(hits)
                state.text = state.text[
                    : index + (len(stop) if seq.sampling_params.include_stop_str_in_output else 0)
                ]
                return "stop", stop
        if reason is not None:  # flush what the incremental decoder held back
            final = self.tokenizer.decode(ids)
            if final.startswith(state.text):
                state.text = final
        return reason, stop_reason

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        if seq.is_finished:
            return
        self.release(seq)
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def _output(self, seq: Sequence, state: _TextState) -> RequestOutput:
        holdback = 0
        if not seq.is_finished and state.stop_strings:
            holdback = max(map(len, state.stop_strings)) - 1  # a stop string may still complete
        shown = len(state.text) - holdback
        delta_text = state.text[state.num_reported_chars : shown] if shown > state.num_reported_chars else ""
        state.num_reported_chars = max(state.num_reported_chars, shown)
        outputs = seq.output_token_ids
        delta_ids = outputs[state.num_reported_tokens :]
        state.num_reported_tokens = len(outputs)
        if seq.is_finished:
            self._texts.pop(seq.request_id, None)
        return RequestOutput(
            seq.request_id,
            seq.prompt,
            seq.prompt_token_ids,
            state.text[: max(shown, 0)],
            outputs,
            delta_text,
            delta_ids,
            seq.finish_reason,
            seq.stop_reason,
            seq.logprobs,
            seq.metrics,
        )
