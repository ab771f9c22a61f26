"""Perplexity vs. context length (sliding window), in the format of the YaRN paper's Table 2.

For each document and each context length L, windows of L tokens end at the document's last token and
every `stride` tokens before it; each window scores only its last `stride` tokens (Press et al.'s sliding
window, S = 256 in PI / YaRN). The number of windows per document is fixed by the *longest* length, so
every length scores exactly the same tokens with more or less context before them: a model that uses
its context gets lower perplexity as L grows; one whose positions break past its window blows up.

    from longreach.eval.ppl import evaluate_perplexity, perplexity_table
    r = evaluate_perplexity("ckpt/", data=["book.txt"], lengths=[1024, 2048, 4096], setting="yarn x4",
                            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    print(perplexity_table([r]))

Without data files the built-in synthetic text is used (fine for checking mechanics, not for claims).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from longreach.attention import AttentionMetadata
from longreach.eval.haystack import SyntheticText
from longreach.eval.plots import plot_perplexity
from longreach.eval.results import format_length
from longreach.model.bundled import resolve_model_path
from longreach.model.loader import load_model
from longreach.model.tokenizer import load_tokenizer

TOKENS_PER_BATCH = 16384  # windows of one length are batched in the flat layout up to this many tokens


@dataclass
class PerplexityResult:
    setting: str
    model: str
    perplexity: dict[int, float]  # context length -> perplexity of the scored tokens
    stride: int  # tokens scored per window
    num_windows: int  # windows per document (the same at every length)
    num_documents: int
    num_scored_tokens: int  # per length; the same tokens at every length

    def to_dict(self) -> dict:
        out = asdict(self)
        out["perplexity"] = {str(k): v for k, v in self.perplexity.items()}
        return out


@torch.inference_mode()
def perplexity_vs_length(
    model,
    documents: Sequence[Sequence[int]],
    lengths: Sequence[int],
    stride: int = 256,
    max_windows: int = 4,
    progress: bool = True,
) -> tuple[dict[int, float], int, int, int]:
    """Sliding-window perplexity of `model` (a LlamaForCausalLM) on token-id `documents` at each length.

    The stride is clamped to half the shortest length so every scored token has at least L/2 tokens of
    context. Documents too short for the longest length with one window are skipped.
    Returns (length -> perplexity, stride used, windows per document, documents used).
    """
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or lengths[0] < 2:
        raise ValueError(f"lengths {lengths} must be token counts >= 2")
    if stride < 1 or max_windows < 1:
        raise ValueError(f"stride={stride} and max_windows={max_windows} must be >= 1")
    stride = max(1, min(stride, lengths[0] // 2))
    longest = lengths[-1]
    docs = [list(d) for d in documents if len(d) >= longest]
    if not docs:
        longest_doc = max((len(d) for d in documents), default=0)
        raise ValueError(
            f"no document has the {longest} tokens the longest length needs "
            f"(longest document: {longest_doc} tokens); give longer data or shorter --lengths"
        )
    num_windows = min(max_windows, *(1 + (len(d) - longest) // stride for d in docs))
    device = next(model.parameters()).device
    # every window (document, end) scores tokens [end - stride, end): the same for every length
    ends = [(d, len(doc) - w * stride) for d, doc in enumerate(docs) for w in range(num_windows)]
    from tqdm import tqdm

    bar = tqdm(total=len(lengths) * len(ends), desc="perplexity", unit="window", disable=not progress)
    result = {}
    try:
        for length in lengths:
            total_nll, total_tokens = 0.0, 0
            per_batch = max(1, TOKENS_PER_BATCH // length)
            for first in range(0, len(ends), per_batch):
                batch = ends[first : first + per_batch]
                ids = torch.tensor(
                    [t for d, end in batch for t in docs[d][end - length : end]], device=device
                )
                meta = AttentionMetadata.from_seqlens([length] * len(batch), device=device)
                positions = torch.arange(length, device=device).repeat(len(batch))
                # logits at positions L-stride-1 .. L-2 of each window predict its last `stride` tokens
                rows = torch.cat(
                    [b * length + torch.arange(length - stride - 1, length - 1) for b in range(len(batch))]
                ).to(device)
                logits = model(ids, positions, meta, logits_indices=rows)  # (B*stride, V)
                targets = ids[rows + 1]
                total_nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
                total_tokens += targets.numel()
                bar.update(len(batch))
            result[length] = math.exp(total_nll / total_tokens)
    finally:
        bar.close()
    return result, stride, num_windows, len(docs)


def load_documents(
    tokenizer, data: Sequence[str | os.PathLike] | None, min_tokens: int, seed: int = 0
) -> list[list[int]]:
    """Token ids of each data file (one document per file), or of synthetic text at least `min_tokens` long."""
    if data:
        docs = []
        for path in data:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"data file {str(path)!r} does not exist")
            docs.append(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))
        return docs
    source = SyntheticText(seed=f"ppl:{seed}")
    num_chars = 4 * min_tokens
    while True:
        ids = tokenizer.encode(source.prefix(num_chars))
        if len(ids) >= min_tokens:
            return [ids]
        num_chars *= 2


def evaluate_perplexity(
    model,
    data: Sequence[str | os.PathLike] | None = None,
    lengths: Sequence[int] = (1024,),
    stride: int = 256,
    max_windows: int = 4,
    tokenizer=None,
    dtype: str | None = None,
    rope_scaling: dict | None = None,
    setting: str | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity vs length of a checkpoint directory (or a loaded model with `tokenizer`) on `data` files.
    device: where a checkpoint is loaded (default: CUDA when available)."""
    if model is None or isinstance(model, (str, Path)):
        path = resolve_model_path(None if model is None else str(model))
        name = path.name
        tokenizer = tokenizer or load_tokenizer(path)
        model = load_model(
            path,
            dtype=dtype,
            rope_scaling=rope_scaling,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
    else:
        if tokenizer is None:
            raise ValueError("pass tokenizer= along with a model object")
        if rope_scaling is not None or dtype is not None:
            raise ValueError(
                "rope_scaling and dtype apply when loading a checkpoint; pass a directory, not a model"
            )
        name = type(model).__name__
    lengths = sorted(set(int(n) for n in lengths))
    needed = lengths[-1] + (max_windows - 1) * max(1, min(stride, lengths[0] // 2))
    docs = load_documents(tokenizer, data, needed, seed)
    ppl, used_stride, num_windows, num_docs = perplexity_vs_length(
        model, docs, lengths, stride, max_windows, progress
    )
    return PerplexityResult(
        setting=setting or name,
        model=name,
        perplexity=ppl,
        stride=used_stride,
        num_windows=num_windows,
        num_documents=num_docs,
        num_scored_tokens=used_stride * num_windows * num_docs,
    )


def perplexity_table(results: Sequence[PerplexityResult]) -> str:
    """YaRN Table 2 layout: one row per setting, one column per evaluation context length."""
    lengths = sorted({n for r in results for n in r.perplexity})
    name_width = max(len("setting"), *(len(r.setting) for r in results)) + 2
    cols = [format_length(n) for n in lengths]
    width = max(9, *(len(c) + 2 for c in cols))
    r0 = results[0]
    lines = [
        f"perplexity of the same {r0.num_scored_tokens} tokens ({r0.num_documents} document(s) x "
        f"{r0.num_windows} window(s) x last {r0.stride} tokens) by evaluation context length",
        "setting".ljust(name_width) + "".join(c.rjust(width) for c in cols),
    ]
    for r in results:
        lines.append(
            r.setting.ljust(name_width) + "".join(_fmt_ppl(r.perplexity.get(n)).rjust(width) for n in lengths)
        )
    return "\n".join(lines)


def _fmt_ppl(value: float | None) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value) or value >= 1e4:
        return f"{value:.2e}"
    return f"{value:.2f}"


def write_perplexity_report(
    results: Sequence[PerplexityResult], out_dir: str | os.PathLike, plot: bool = True
) -> dict[str, Path]:
    """ppl.json, ppl.txt (the table) and, with plot, perplexity.png in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ppl.json").write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
    (out_dir / "ppl.txt").write_text(perplexity_table(results) + "\n")
    paths = {"results": out_dir / "ppl.json", "table": out_dir / "ppl.txt"}
    if plot:
        paths["plot"] = plot_perplexity(results, out_dir / "perplexity.png")
    return paths
