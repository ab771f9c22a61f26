"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) on flattened tokens.

Every batch is one `(T, ...)` tensor plus `positions` (restarting at 0 per sequence) and an
`AttentionMetadata` (cu_seqlens): training packs, serving prefill and decode all run this one
path. Parameter names are Hugging Face's, so loading a checkpoint is a plain copy.
GQA/MQA, RMSNorm, SwiGLU, tied or untied embeddings, Qwen2's qkv bias, Mistral/Qwen2 sliding windows.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from longreach.attention import AttentionMetadata, attention
from longreach.config import ModelConfig
from longreach.rope import RotaryEmbedding, apply_rotary


class KVCache(Protocol):
    """What a KV cache does for the model: store this layer's new K/V, attend over everything stored."""

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        window_size: tuple[int, int],
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.window_size = cfg.window_size(layer_idx)
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache: KVCache | None = None):
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is None:
            out = attention(q, k, v, meta, window_size=self.window_size)
        else:
            out = kv_cache.attend(self.layer_idx, q, k, v, meta, self.window_size)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rope)

    def forward(self, input_ids, positions, meta, kv_cache=None, rope_seq_len=None):
        x = self.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = self.rotary_emb(positions, rope_seq_len)  # (T, rotary_dim/2) each
        for layer in self.layers:
            x = layer(x, cos, sin, meta, kv_cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """`model(input_ids)` with (B, T) or (T,) ids returns logits (B, T, V) or (T, V).

    Engines and trainers pass the flat layout themselves: `input_ids` (T,), `positions` (T,),
    `meta` (AttentionMetadata), optionally a `kv_cache` and `logits_indices` (only those rows
    go through the LM head: the last token of each sequence when sampling).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        meta: AttentionMetadata | None = None,
        kv_cache: KVCache | None = None,
        logits_indices: torch.Tensor | None = None,
        rope_seq_len: int | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        batch_shape = None
        if meta is None:
            if input_ids.dim() not in (1, 2):
                raise ValueError(f"input_ids must be (T,) or (B, T); got shape {tuple(input_ids.shape)}")
            batch_shape = input_ids.shape
            num_seqs, seqlen = (1, input_ids.shape[0]) if input_ids.dim() == 1 else input_ids.shape
            meta = AttentionMetadata.from_seqlens([seqlen] * num_seqs, device=input_ids.device)
            if positions is None:
                positions = torch.arange(seqlen, device=input_ids.device).repeat(num_seqs)
            input_ids = input_ids.reshape(-1)
        if positions is None:
            raise ValueError("positions are required when meta is given")
        hidden = self.model(input_ids, positions.reshape(-1), meta, kv_cache, rope_seq_len)  # (T, hidden)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        if return_hidden:
            return hidden
        logits = self.lm_head(hidden)  # (T, V)
        if batch_shape is not None and logits_indices is None:
            logits = logits.view(*batch_shape, -1)
        return logits
