"""The simplest KV cache: one contiguous buffer per sequence and layer.

Used by `longreach generate` and as the baseline the paged engine is checked against.
Buffers are `(num_seqs, max_len, Hkv, D)`; each step appends every sequence's new tokens.
"""

from __future__ import annotations

import torch

from longreach.attention import AttentionMetadata, flash_attn_varlen_func
from longreach.config import ModelConfig


class ContiguousKVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_seqs: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if max_len < 1 or num_seqs < 1:
            raise ValueError(f"num_seqs={num_seqs} and max_len={max_len} must be >= 1")
        shape = (num_seqs, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.lengths = [0] * num_seqs  # tokens stored per sequence (committed)
        self._new: list[int] | None = None  # tokens each sequence adds in the current step

    def prepare(self, num_new: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """Start a step in which sequence b adds num_new[b] tokens: (metadata, positions (T,))."""
        if len(num_new) != len(self.lengths):
            raise ValueError(f"{len(num_new)} sequences in this step, cache holds {len(self.lengths)}")
        ends = [n + length for n, length in zip(num_new, self.lengths)]
        if max(ends) > self.max_len:
            raise ValueError(
                f"sequence would reach {max(ends)} tokens; the cache holds at most {self.max_len}"
            )
        self._new = list(num_new)
        device = self.k[0].device
        positions = torch.cat(
            [torch.arange(length, end, device=device) for length, end in zip(self.lengths, ends)]
        )
        return AttentionMetadata.from_seqlens(num_new, ends, device=device), positions

    def attend(self, layer_idx, q, k, v, meta, window_size):
        keys, values, start = [], [], 0
        for b, (length, n) in enumerate(zip(self.lengths, self._new)):
            self.k[layer_idx][b, length : length + n] = k[start : start + n]
            self.v[layer_idx][b, length : length + n] = v[start : start + n]
            keys.append(self.k[layer_idx][b, : length + n])  # (Sk_b, Hkv, D)
            values.append(self.v[layer_idx][b, : length + n])
            start += n
        return flash_attn_varlen_func(
            q,
            torch.cat(keys),
            torch.cat(values),
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.max_seqlen_k,
            causal=True,
            window_size=window_size,
        )

    def commit(self) -> None:
        """End the step: the tokens written in it become part of every sequence's history."""
        self.lengths = [length + n for length, n in zip(self.lengths, self._new)]
        self._new = None
