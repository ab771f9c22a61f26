"""From what `LLM.generate` / `LLM.chat` are given to token-id prompts (vLLM's prompt preparation).

A prompt is text or a list of token ids; a batch is a list of them, with one `SamplingParams` for all or one
each. Chat messages (one conversation, or a list of conversations) go through the tokenizer's chat template and
are tokenized without the tokenizer's own special tokens, since the template writes them (as transformers'
`apply_chat_template(tokenize=True)` and vLLM's `LLM.chat` do).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from longreach.engine.sampling_params import SamplingParams
from longreach.model.chat_template import render_chat_template

Prompt = str | list[int]
Message = dict[str, Any]


def as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or a batch -> a batch."""
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        return [prompts]
    return list(prompts)


def params_per_prompt(
    sampling_params: SamplingParams | Seq[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt: the same for all (None: the defaults), or one each."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(
            f"got {len(params)} sampling_params for {num_prompts} prompts; pass one for all, or one per prompt"
        )
    return params


def encode_prompt(tokenizer: Any, prompt: Prompt, vocab_size: int) -> list[int]:
    """Token ids of a prompt (text through the tokenizer, ids checked against the vocabulary)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; this engine has none (pass token-id lists)")
        ids = list(tokenizer.encode(prompt))
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty: at least one token is needed")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def as_conversations(messages: Seq[Message] | Seq[Seq[Message]]) -> list[list[Message]]:
    """One conversation (a list of {"role", "content"} dicts) or a list of them -> a list of them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages={messages!r}: expected a non-empty list of messages or of conversations")
    if all(isinstance(m, (list, tuple)) for m in messages):
        conversations = [list(c) for c in messages]
    else:
        conversations = [list(messages)]
    for index, conversation in enumerate(conversations):
        if not conversation:
            raise ValueError(f"conversation {index} is empty: at least one message is needed")
    return conversations


def chat_prompt_ids(
    tokenizer: Any, conversation: list[Message], chat_template: str | None, add_generation_prompt: bool
) -> list[int]:
    """A conversation through the chat template (the tokenizer's, or `chat_template`: a template string or the
    name of one of the tokenizer's), tokenized without added special tokens."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer with a chat template; this model has none")
    if chat_template is not None and not hasattr(tokenizer, "chat_templates"):  # no named templates to pick
        text = render_chat_template(chat_template, conversation, add_generation_prompt)
    elif chat_template is not None:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, chat_template=chat_template
        )
    else:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text, add_bos=False))


def check_fits(
    num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, plan: Any, max_num_batched_tokens: int
) -> int:
    """The most tokens (prompt + output) a request can reach; ValueError when its prompt leaves no room for a
    generated token or its KV cache could never fit in `plan` (a `KVPlan`)."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_prompt_tokens} tokens but max_model_len is {max_model_len}: it must be shorter, "
            "leaving room for at least one generated token"
        )
    longest = min(num_prompt_tokens + (max_tokens or max_model_len), max_model_len)
    needed = plan.max_held_tokens(longest, max_num_batched_tokens)
    if needed > plan.capacity_tokens:
        raise ValueError(
            f"request needs up to {needed} tokens of KV cache ({num_prompt_tokens} prompt + up to "
            f"{longest - num_prompt_tokens} generated) but the cache holds {plan.capacity_tokens} "
            f"({plan.num_blocks} blocks of {plan.block_size}); lower max_tokens or give the cache more memory"
        )
    return longest
