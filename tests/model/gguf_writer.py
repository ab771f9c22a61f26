"""Write GGUF files the way llama.cpp's convert_hf_to_gguf.py lays them out, for tests.

Metadata keys `{arch}.*`, tensor names `blk.N.attn_q.weight` ..., Llama/Mistral q/k rows permuted (the converter's
`permute`), 1-D tensors kept F32, matrices in the asked type (quantized with gguf.quants), a byte-level BPE
tokenizer in `tokenizer.ggml.*`. K-quant types have no quantizer in gguf.quants: `random_blocks` makes valid
blocks of them (finite fp16 scales) for tests that compare two readers of the same file.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from longreach.model.gguf_quant import permute_rows
from longreach.model.gguf_tokenizer import bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def tiny_vocab() -> tuple[list[str], list[int]]:
    """(tokens, token types): the 256 byte symbols, one token per merge, then three control tokens."""
    tokens = list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    return tokens, types


VOCAB_SIZE = len(tiny_vocab()[0])


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def random_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, seed: int = 0) -> np.ndarray:
    """Random but valid quantized rows: random payload bytes, fp16 scale fields set to small finite values."""
    block_elems, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    scale_offsets = {
        "Q4_K": (0, 2),
        "Q5_K": (0, 2),
        "Q6_K": (208,),
        "Q4_0": (0,),
        "Q4_1": (0, 2),
        "Q8_0": (0,),
    }
    for offset in scale_offsets[qtype.name]:
        scales = rng.uniform(1e-3, 4e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_elems * block_bytes)


def _encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return quants.quantize(array.astype(np.float32), qtype)


def write_gguf(
    path,
    hf_model,
    qtype: str = "F32",
    arch: str | None = None,
    name: str = "tiny",
    random_quant: bool = False,
    extra: dict | None = None,
) -> None:
    """`hf_model` (a transformers Llama/Mistral/Qwen2) as a GGUF file at `path`.

    qtype: the matrices' type. random_quant: fill matrices with `random_blocks` instead of quantizing the model's
    weights (K-quants). arch defaults to llama.cpp's choice: 'llama' for Llama and Mistral, 'qwen2' for Qwen2.
    """
    cfg = hf_model.config
    arch = arch or ("qwen2" if cfg.model_type == "qwen2" else "llama")
    qt = GGMLQuantizationType[qtype]
    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch != "qwen2":
        w.add_rope_dimension_count(head_dim)
    if getattr(cfg, "sliding_window", None) and cfg.model_type == "mistral":
        w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra or {}).items():
        w.add_key_value(key, value[0], value[1])
    rope = dict(cfg.rope_parameters)
    if rope.get("rope_type") == "llama3":  # llama.cpp stores it as per-dimension divisors
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, head_dim))
    for hf_name, tensor in hf_model.state_dict().items():
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight" or "rotary_emb" in hf_name:
            continue
        name = gguf_name(hf_name)
        tensor = tensor.detach().float()
        if arch in ("llama", "mistral") and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            tensor = permute_rows(tensor, heads)
        array = tensor.numpy()
        if array.ndim == 1:
            w.add_tensor(name, array.astype(np.float32))
        elif random_quant:
            rows, cols = array.shape
            data = random_blocks(rows, cols, qt, seed=zlib.crc32(name.encode()))
            w.add_tensor(name, data, raw_dtype=qt)
        else:
            data = _encode(array, qt)
            w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's LlamaModel.generate_extra_tensors writes for Llama 3.1 scaling (rope_freqs.weight)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def round_trip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a weight becomes after quantizing to `qtype` and back (gguf.quants), in fp32."""
    qt = GGMLQuantizationType[qtype]
    array = weight.detach().float().numpy()
    if qt == GGMLQuantizationType.F32:
        return weight.detach().float().clone()
    if qt == GGMLQuantizationType.F16:
        return torch.from_numpy(array.astype(np.float16).astype(np.float32))
    return torch.from_numpy(quants.dequantize(quants.quantize(array, qt), qt).copy())
