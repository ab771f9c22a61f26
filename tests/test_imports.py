"""Every module of the package imports on this machine (CPU, no optional GPU stack), and the declared Python
floor matches what the code needs (tomllib is 3.11+)."""

import importlib
import pkgutil
import sys
import tomllib
from pathlib import Path

import pytest

import longreach

ROOT = Path(__file__).resolve().parents[1]


def _module_names() -> list[str]:
    return sorted(
        info.name for info in pkgutil.walk_packages(longreach.__path__, prefix="longreach.", onerror=_raise)
    )


def _raise(name: str) -> None:
    raise ImportError(f"cannot walk package {name}")


def _triton_missing() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.parametrize("name", [n for n in _module_names() if n != "longreach.__main__"])
def test_every_module_imports(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == "triton" and _triton_missing():
            pytest.skip(f"{name} needs triton, which this machine lacks")
        raise


def test_main_module_compiles():
    """`python -m longreach` runs the CLI when imported, so it is compiled, not imported."""
    path = ROOT / "longreach" / "__main__.py"
    compile(path.read_text(), str(path), "exec")


def test_the_walk_sees_the_whole_package():
    names = _module_names()
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "longreach").rglob("*.py")
    }
    assert set(names) | {"longreach"} == files


def test_requires_python_covers_the_standard_library_we_use():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # tomllib (train/config.py, train/extend.py) is 3.11+
    assert sys.version_info >= (3, 11)
