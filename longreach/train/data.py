"""Documents -> fixed-length training sequences in the flat varlen (THD) layout.

Packing follows transformers' `DataCollatorWithFlattening` and torchtitan: documents are concatenated
into `seq_len`-token rows, `positions` restart at 0 at every document, document boundaries become
`cu_seqlens` (so attention never crosses them), and the last token of each document piece has no target
(labels = IGNORE_INDEX), so the loss never predicts one document from another. A document longer than
the room left is continued in the next row, where its positions restart at 0. The padded mode (one
document piece per row, padded to `seq_len`; `trim_padding` then cuts a batch to its longest row) exists for
comparison.

Files are read and tokenized as they stream (never the whole corpus in memory): `.txt`/`.md` files are
one document each, read in chunks of lines; `.jsonl` files hold one document per line in `text_field`.
The order is deterministic and resumable: `state_dict()` is the exact cursor (epoch, file, byte
offset, token offset) after the last sequence returned. Only the *file* order is shuffled (per epoch,
from the seed); documents within a file, and the rows cut from them, always come in file order (there
is no shuffle buffer), so a corpus held in one file is read front to back every epoch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from longreach.attention import AttentionMetadata

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CHUNK_BYTES = 1 << 16


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


def list_data_files(paths: list[str] | tuple[str, ...]) -> list[Path]:
    """Text and JSONL files under `paths` (files or directories, searched recursively), sorted per path."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
            if not found:
                raise ValueError(f"data directory {str(p)!r} holds no {TEXT_SUFFIXES + JSONL_SUFFIXES} files")
            files += found
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise ValueError(
                    f"data file {str(p)!r}: unsupported suffix {p.suffix!r}; "
                    f"accepted {TEXT_SUFFIXES + JSONL_SUFFIXES}"
                )
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    return files


@dataclass(frozen=True)
class Piece:
    """A run of text from one document, and where it lies in its file."""

    text: str
    is_doc_start: bool
    is_doc_end: bool
    offset: int  # byte offset of the piece
    next_offset: int  # byte offset just after it


def _utf8_cut(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: complete only if the sequence it starts is all there
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


def read_pieces(
    path: Path, offset: int = 0, text_field: str = "text", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[Piece]:
    """Pieces of `path` from byte `offset`: JSONL lines (one document each) or chunks of a text file."""
    is_jsonl = path.suffix in JSONL_SUFFIXES
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            start = f.tell()
            if is_jsonl:
                line = f.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} (byte {start}): not a JSON line: {exc}") from exc
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(
                        f"{path} (byte {start}): no string field {text_field!r} "
                        f"(keys: {sorted(record) if isinstance(record, dict) else type(record).__name__})"
                    )
                if record[text_field]:
                    yield Piece(record[text_field], True, True, start, f.tell())
            else:
                data = f.read(chunk_bytes)
                if not data:
                    return
                if not data.endswith(b"\n"):
                    data += f.readline(chunk_bytes)  # end at a line break when one is near
                cut = _utf8_cut(data)
                f.seek(start + cut)
                at_end = not f.peek(1)
                yield Piece(
                    data[:cut].decode("utf-8", errors="replace"), start == 0, at_end, start, start + cut
                )


@dataclass(frozen=True)
class Sample:
    """One training row. input_ids, labels, positions: (L,) int64; seqlens: attention sequences, sum L."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    seqlens: tuple[int, ...]
    num_tokens: int  # tokens that are not padding


@dataclass(frozen=True)
class Batch:
    """Samples flattened into the model's layout: (T,) tensors plus attention metadata."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    num_tokens: int  # non-padding input tokens
    num_targets: int  # labels that count in the loss
    kv_cache: Any = None  # the model's K/V provider: context parallelism's ring (context_parallel.py)


def collate(samples: list[Sample], device: torch.device | str = "cpu") -> Batch:
    seqlens = [n for s in samples for n in s.seqlens]
    labels = torch.cat([s.labels for s in samples])
    return Batch(
        torch.cat([s.input_ids for s in samples]).to(device),
        labels.to(device),
        torch.cat([s.positions for s in samples]).to(device),
        AttentionMetadata.from_seqlens(seqlens, device=device),
        sum(s.num_tokens for s in samples),
        int((labels != IGNORE_INDEX).sum()),
    )


class SequenceStream:
    """Endless, deterministic stream of `Sample`s over a corpus (epoch after epoch).

    packing=True fills every row (documents back to back, positions reset per document);
    packing=False gives one document piece per row, padded with `pad_id`. shuffle=True reorders the
    files each epoch (seeded); it never reorders documents inside a file.
    """

    def __init__(
        self,
        paths,
        tokenizer: Tokenizer,
        seq_len: int,
        packing: bool = True,
        text_field: str = "text",
        shuffle: bool = True,
        seed: int = 0,
        add_bos: bool = True,
        add_eos: bool = True,
        pad_id: int | None = None,
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (a token and its target)")
        self.files = list_data_files(paths)
        self.tokenizer, self.seq_len, self.packing, self.text_field = tokenizer, seq_len, packing, text_field
        self.shuffle, self.seed = shuffle, seed
        self.bos_id = getattr(tokenizer, "bos_token_id", None) if add_bos else None
        self.eos_id = getattr(tokenizer, "eos_token_id", None) if add_eos else None
        self.pad_id = pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None) or 0
        self.epoch, self.file_index, self.offset, self.token_offset, self.num_samples = 0, 0, 0, 0, 0
        self._order = self._file_order(0)
        self._pieces: Iterator[Piece] | None = None
        self._piece: tuple[list[int], Piece] | None = None

    # ---------------------------------------------------------------- cursor

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "file_index": self.file_index,
            "offset": self.offset,
            "token_offset": self.token_offset,
            "num_samples": self.num_samples,
            "files": [str(f) for f in self.files],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("files") is not None and state["files"] != [str(f) for f in self.files]:
            raise ValueError(
                f"the data files changed since this state was saved: it was written for "
                f"{len(state['files'])} file(s) {state['files'][:3]}..., now {len(self.files)}"
            )
        self.epoch, self.file_index, self.offset = state["epoch"], state["file_index"], state["offset"]
        self.token_offset, self.num_samples = state["token_offset"], state["num_samples"]
        self._order, self._pieces, self._piece = self._file_order(self.epoch), None, None

    def _file_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _current(self) -> tuple[list[int], Piece]:
        """The tokens of the piece under the cursor (moving to the next file / epoch as needed)."""
        files_ended = 0  # a full cycle over every file without a token means there is no text at all
        while self._piece is None:
            if self._pieces is None:
                path = self.files[self._order[self.file_index]]
                self._pieces = read_pieces(path, self.offset, self.text_field)
            piece = next(self._pieces, None)
            if piece is not None:
                ids = self.tokenizer.encode(piece.text, add_bos=False)
                if piece.is_doc_start and self.bos_id is not None:
                    ids = [self.bos_id, *ids]
                if piece.is_doc_end and self.eos_id is not None:
                    ids.append(self.eos_id)
                self.offset = piece.offset
                if ids:
                    self._piece = (ids, piece)
                else:
                    self.offset = piece.next_offset
                continue
            self._pieces, self.offset, self.token_offset = None, 0, 0
            self.file_index += 1
            files_ended += 1
            if files_ended > len(self.files):
                raise ValueError(
                    f"no text in the data files {[str(f) for f in self.files][:5]}"
                    f"{' ...' if len(self.files) > 5 else ''}"
                )
            if self.file_index == len(self.files):
                self.epoch, self.file_index = self.epoch + 1, 0
                self._order = self._file_order(self.epoch)
        return self._piece

    def _advance(self, count: int) -> bool:
        """Consume `count` tokens of the current piece; True when that ended a document."""
        ids, piece = self._piece
        self.token_offset += count
        if self.token_offset < len(ids):
            return False
        self._piece, self.offset, self.token_offset = None, piece.next_offset, 0
        return piece.is_doc_end

    # ---------------------------------------------------------------- rows

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        ids: list[int] = []
        seqlens: list[int] = []
        open_len = 0  # length of the document piece still open at the end of `ids`
        while len(ids) < self.seq_len:
            tokens, piece = self._current()
            starts_doc = self.token_offset == 0 and piece.is_doc_start
            if starts_doc and open_len:
                if not self.packing:
                    break
                seqlens.append(open_len)
                open_len = 0
            take = tokens[self.token_offset : self.token_offset + self.seq_len - len(ids)]
            ids += take
            open_len += len(take)
            if self._advance(len(take)):
                seqlens.append(open_len)
                open_len = 0
                if not self.packing:
                    break
        if open_len:
            seqlens.append(open_len)
        self.num_samples += 1
        return self._make_sample(ids, seqlens)

    def _make_sample(self, ids: list[int], seqlens: list[int]) -> Sample:
        num_tokens = len(ids)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        positions = torch.empty(self.seq_len, dtype=torch.long)
        input_ids = torch.tensor(ids + [self.pad_id] * (self.seq_len - num_tokens), dtype=torch.long)
        start = 0
        for n in seqlens:  # targets stay inside each document piece; its last token predicts nothing
            labels[start : start + n - 1] = input_ids[start + 1 : start + n]
            positions[start : start + n] = torch.arange(n)
            start += n
        if num_tokens < self.seq_len:
            # padding rides at the end of the last row sequence: causal attention keeps real tokens blind to it
            positions[num_tokens:] = torch.arange(seqlens[-1], seqlens[-1] + self.seq_len - num_tokens)
            seqlens[-1] += self.seq_len - num_tokens
        return Sample(input_ids, labels, positions, tuple(seqlens), num_tokens)


def trim_padding(samples: list[Sample]) -> list[Sample]:
    """Padded rows cut to the longest real row among them: a batch pads to its longest document, as
    transformers' DataCollatorWithPadding does, not to seq_len. Packed (full) rows come back unchanged;
    only trailing padding goes, so targets, positions and every real token's attention are the same."""
    longest = max((s.num_tokens for s in samples), default=0)
    trimmed = []
    for s in samples:
        cut = len(s.input_ids) - max(longest, 1)
        if cut <= 0:
            trimmed.append(s)
            continue
        seqlens = (*s.seqlens[:-1], s.seqlens[-1] - cut)  # the padding rides at the end of the last one
        keep = len(s.input_ids) - cut
        trimmed.append(Sample(s.input_ids[:keep], s.labels[:keep], s.positions[:keep], seqlens, s.num_tokens))
    return trimmed


def take_samples(stream: SequenceStream, count: int) -> list[Sample]:
    return [next(stream) for _ in range(count)]
