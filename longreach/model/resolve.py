"""One rule for a model argument: a checkpoint directory, a `.gguf` file, or a Hub id -> a checkpoint directory.

- a directory: itself (a Hugging Face checkpoint);
- a GGUF file: a small directory in the cache (`$LONGREACH_CACHE`, else `~/.cache/longreach`, at
  `gguf/<key>/<file stem>`, the key hashing the file's absolute path, size and mtime), holding config.json,
  tokenizer.json, tokenizer_config.json and generation_config.json converted once from its metadata, and
  `gguf_source.json` naming the file. `load_model`
  reads the weights from the GGUF itself, dequantized to the dtype asked for, so the cache never holds a multi-GB
  dequantized copy and every other consumer (tokenizer, server, trainer) sees an ordinary checkpoint directory;
- `org/name` (optionally `org/name/file.gguf`): the snapshot in the local Hugging Face cache, found offline
  (`huggingface_hub.snapshot_download(..., local_files_only=True)`); a snapshot holding one GGUF and no
  config.json resolves to that GGUF as above.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from longreach.model.gguf import GGUFFile, generation_config, hf_config, is_gguf_file

GGUF_SOURCE = "gguf_source.json"
# bump when the files written for a GGUF change, so older cache entries are rebuilt
CACHE_FORMAT = 2
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/]+\.gguf)?$")


def cache_dir() -> Path:
    """Where longreach caches derived files: $LONGREACH_CACHE, else ~/.cache/longreach."""
    return Path(os.environ.get("LONGREACH_CACHE") or "~/.cache/longreach").expanduser()


def is_hub_id(text: str) -> bool:
    """True for `org/name` or `org/name/file.gguf` (a Hub model id, possibly naming a GGUF file in it)."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~"))


def resolve_model(model: str | os.PathLike) -> Path:
    """A checkpoint directory for `model` (a directory, a .gguf file or a Hub id); errors name what was given."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if is_gguf_file(path):
            return gguf_checkpoint_dir(path)
        if path.name == "config.json":
            return path.parent
        raise ValueError(
            f"model {text!r} is a file but not a GGUF file; give a checkpoint directory, a .gguf file or a Hub id"
        )
    if is_hub_id(text):
        return hub_checkpoint_dir(text)
    raise FileNotFoundError(
        f"model {text!r} does not exist: not a checkpoint directory, a .gguf file or a Hub id (org/name)"
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: HF_HUB_CACHE, else HF_HOME/hub, else default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_checkpoint_dir(model_id: str) -> Path:
    """The local snapshot of Hub id `org/name` (or the GGUF file `org/name/file.gguf` in it), offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    parts = model_id.split("/")
    repo_id, file_name = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else None)
    hub_cache = hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=hub_cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, OSError) as exc:
        raise FileNotFoundError(
            f"model {model_id!r} is not a local path and Hub id {repo_id!r} is not in the Hugging Face cache "
            f"{hub_cache} ({type(exc).__name__}); download it once where the network is reachable with "
            f"`hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`), or point "
            "HF_HUB_CACHE / HF_HOME at the cache that holds it; with HF_HUB_OFFLINE=1 nothing is fetched"
        ) from None
    if file_name is not None:
        target = snapshot / file_name
        if not target.is_file():
            raise FileNotFoundError(f"Hub snapshot {snapshot} of {repo_id!r} has no file {file_name!r}")
        return resolve_model(target)
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return gguf_checkpoint_dir(ggufs[0])
    if ggufs:
        raise ValueError(
            f"Hub snapshot {snapshot} of {repo_id!r} holds {len(ggufs)} GGUF files "
            f"({', '.join(p.name for p in ggufs[:6])}); name one: {repo_id}/FILE.gguf"
        )
    raise FileNotFoundError(
        f"Hub snapshot {snapshot} of {repo_id!r} has neither config.json nor a .gguf file"
    )


def gguf_checkpoint_dir(gguf_path: str | os.PathLike) -> Path:
    """The cache directory standing for `gguf_path` (config, tokenizer, source pointer), made once."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / digest / gguf_path.stem  # named as the file, for logs and eval summaries
    if (out / GGUF_SOURCE).is_file():
        return out
    write_gguf_checkpoint_dir(gguf_path, out)
    return out


def write_gguf_checkpoint_dir(gguf_path: Path, out: Path) -> None:
    """Write the metadata files for `gguf_path` into `out` atomically (temporary dir renamed into place)."""
    from longreach.model.gguf_tokenizer import tokenizer_files  # lazy: builds tokenizers only when converting

    g = GGUFFile(gguf_path)
    files = {"config.json": json.dumps(hf_config(g), indent=2, sort_keys=True) + "\n"}
    if g.get("tokenizer.ggml.model") is not None:
        files.update(tokenizer_files(g))
    generation = generation_config(g)
    if generation is not None:
        files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    stat = gguf_path.stat()
    source = {"gguf_file": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    files[GGUF_SOURCE] = json.dumps(source, indent=2) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: keep its copy
            if not (out / GGUF_SOURCE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_source(directory: str | os.PathLike) -> Path | None:
    """The GGUF file a cache directory stands for (checked unchanged since), or None for other directories."""
    pointer = Path(directory) / GGUF_SOURCE
    if not pointer.is_file():
        return None
    source = json.loads(pointer.read_text(encoding="utf-8"))
    path = Path(source["gguf_file"])
    if not path.is_file():
        raise FileNotFoundError(f"{pointer}: its GGUF file {str(path)!r} no longer exists")
    stat = path.stat()
    if (stat.st_size, stat.st_mtime_ns) != (source["size"], source["mtime_ns"]):
        raise ValueError(
            f"{pointer}: the GGUF file {str(path)!r} changed since this directory was made from it; "
            "load the .gguf file itself (a fresh cache entry is made)"
        )
    return path
