"""Dequantization (gguf.quants, used by our reader) checked against an independent implementation
(transformers' torch dequantizers), K-quant files against transformers' GGUF loader, and bad files."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from longreach.model.gguf import GGUFError
from longreach.model.gguf_quant import GGUFTensorTypeError, dequantize, unpermute_rows
from longreach.model.loader import load_model
from tests.model.conftest import make_hf_model
from tests.model.gguf_writer import VOCAB_SIZE, random_blocks, write_gguf

transformers = pytest.importorskip("transformers")

QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def _reader_tensor(data: np.ndarray, qtype: str, shape: tuple[int, int]):
    """What gguf.GGUFReader hands us for a tensor: raw data, type id, GGUF (innermost-first) shape."""
    return SimpleNamespace(
        name="t", tensor_type=GGMLQuantizationType[qtype], shape=np.array(shape[::-1]), data=data
    )


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_dequantize_matches_transformers_torch_dequantizer(qtype):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rows, cols = 6, 512
    data = random_blocks(rows, cols, GGMLQuantizationType[qtype], seed=3)
    ours = dequantize(_reader_tensor(data, qtype, (rows, cols)))
    theirs = hf_dequantize(torch.from_numpy(data.reshape(-1).copy()), int(GGMLQuantizationType[qtype]))
    assert ours.shape == (rows, cols)
    assert torch.equal(ours, theirs.reshape(rows, cols))
    assert ours.abs().max() > 0


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types_are_read_exactly(qtype):
    values = torch.randn(3, 8)
    if qtype == "BF16":
        values = values.to(torch.bfloat16).float()
        data = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(3, 16)
    elif qtype == "F16":
        values = values.half().float()
        data = values.half().numpy()
    else:
        data = values.numpy()
    assert torch.equal(dequantize(_reader_tensor(data, qtype, (3, 8))), values)


def test_unpermute_inverts_llama_cpp_permute():
    from tests.model.gguf_writer import permute_rows

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rows(permute_rows(w, 3), 3), w)
    assert not torch.equal(permute_rows(w, 3), w)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q4_1", "BF16"])
def test_file_logits_match_transformers_gguf_loader(tmp_path, qtype):
    """gguf.quants cannot quantize K-quants: a file of random valid blocks, read by us and by transformers."""
    pytest.importorskip("accelerate")
    source = make_hf_model("llama", vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512)
    path = tmp_path / f"k-{qtype}.gguf"
    write_gguf(path, source, qtype, random_quant=qtype != "BF16")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours = load_model(path, dtype="fp32")
    ids = torch.randint(0, VOCAB_SIZE, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = theirs(ids).logits[0], ours(ids[0])
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def _tiny_file(tmp_path, **kwargs):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, make_hf_model("llama", vocab_size=VOCAB_SIZE), **kwargs)
    return path


def test_truncated_file_is_named(tmp_path):
    path = _tiny_file(tmp_path, qtype="Q8_0")
    data = path.read_bytes()
    for cut in (len(data) - 100, 200):  # inside the tensor data, inside the metadata
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated") as info:
            load_model(bad)
        assert str(bad) in str(info.value)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_model(bad)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "phi.gguf"
    w = GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="unsupported architecture 'phi3'; supported: llama, mistral, qwen2"):
        load_model(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "int.gguf"
    w = GGUFWriter(str(path), "llama")
    for add, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16)):
        getattr(w, f"add_{add}")(value)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFTensorTypeError, match="'blk.0.attn_q.weight' is stored as I32, which cannot be"):
        load_model(path)
