"""Tiny random Hugging Face checkpoints, made offline with transformers' save_pretrained."""

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def make_hf_model(model_type="llama", rope_parameters=None, **overrides):
    import transformers

    cls_config = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[model_type]
    cls_model = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[model_type]
    kwargs = {**TINY, **overrides}
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    rope = {"rope_type": "default", "rope_theta": 10000.0, **(rope_parameters or {})}
    config = cls_config(**kwargs, rope_parameters=rope)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls_model(config).eval()
    with torch.no_grad():  # HF inits biases to zero: randomise so the bias paths are checked
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (model_type, rope_parameters, **config overrides) -> (directory, transformers model)."""

    def make(model_type="llama", rope_parameters=None, **overrides):
        model = make_hf_model(model_type, rope_parameters, **overrides)
        path = tmp_path / f"{model_type}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(path)
        return path, model

    return make
