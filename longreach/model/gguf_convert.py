"""`longreach convert FILE.gguf OUT_DIR`: a GGUF file -> a Hugging Face checkpoint directory.

    longreach convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf --dtype fp32

OUT_DIR gets config.json, model.safetensors (dequantized to --dtype; default fp32 for quantized files, F16/BF16
files keep theirs), tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json when
the metadata names bos/eos; transformers' `from_pretrained(OUT_DIR)` loads it. Written atomically: a temporary
directory renamed into place, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from longreach.model.gguf import GGUFFile, generation_config, load_gguf_model
from longreach.model.gguf_tokenizer import tokenizer_files
from longreach.model.safetensors_io import resolve_dtype, save_model


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write the Hugging Face directory for `gguf_path` to `out_dir` (replaced if it exists); returns it."""
    g = GGUFFile(gguf_path)
    model = load_gguf_model(g.path, resolve_dtype(dtype))
    extra = tokenizer_files(g) if g.get("tokenizer.ggml.model") is not None else {}
    generation = generation_config(g)
    if generation is not None:
        extra["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    return save_model(model, out_dir, extra_files=extra)


def trainable_checkpoint(model: str | os.PathLike) -> Path:
    """A checkpoint directory holding safetensors weights for `model` (a directory, .gguf file or Hub id):
    trainers read safetensors directly, so a GGUF is converted once (fp32) next to its cache entry."""
    from longreach.model.bundled import resolve_model_path  # lazy: CLI verb, keeps --help fast
    from longreach.model.resolve import gguf_source  # lazy: CLI verb, keeps --help fast

    directory = resolve_model_path(str(model))
    source = gguf_source(directory)
    if source is None:
        return directory
    out = directory.with_name(f"{directory.name}-fp32")
    if not (out / "model.safetensors").is_file():
        convert_gguf(source, out, "fp32")
    return out


def add_arguments(parser) -> None:
    parser.add_argument(
        "gguf", help="the .gguf file (a Hub id org/name/FILE.gguf from the local cache works too)"
    )
    parser.add_argument("out_dir", help="the Hugging Face checkpoint directory to write")
    parser.add_argument(
        "--dtype",
        default=None,
        help="fp32 | bf16 | fp16 (default: fp32 for quantized tensors, else the stored F16/BF16)",
    )


def _gguf_file(argument: str) -> Path:
    from longreach.model.bundled import resolve_model_path  # lazy: CLI verb, keeps --help fast
    from longreach.model.resolve import gguf_source  # lazy: CLI verb, keeps --help fast

    path = Path(argument).expanduser()
    if path.is_file():
        return path
    directory = resolve_model_path(argument)
    source = gguf_source(directory)
    if source is None:
        raise ValueError(f"{argument!r} is already a checkpoint directory ({directory}), not a GGUF file")
    return source


def main(args) -> int:
    try:
        source = _gguf_file(args.gguf)
        out = convert_gguf(source, args.out_dir, args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"longreach convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"longreach convert: wrote {out} from {source}", file=sys.stderr)
    return 0
