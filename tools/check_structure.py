"""Structure facts of the `longreach` package, checked in CI (tests/test_structure.py) and runnable by hand:

    python tools/check_structure.py          # prints every violation, exits 1 if there is any

- no import cycles between two modules (a -> b -> a), counting imports at any depth of a module;
- no function over 60 lines, Triton kernels (`@triton.jit`) aside;
- no class with more than 15 methods;
- no project import inside a function, except where the line says why with a `# lazy:` comment (an optional
  heavy dependency, or a CLI verb that keeps `--help` fast).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "longreach"
MAX_FUNCTION_LINES = 60
MAX_METHODS = 15
ROOT = Path(__file__).resolve().parent.parent


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """Absolute module names an import statement refers to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _project_imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in _resolve(name, node, path.name == "__init__.py") if t in modules)
        targets.discard(name)
        graph[name] = targets
    return graph


def import_cycles(root: Path = ROOT) -> list[str]:
    """Pairs of modules that import each other (TYPE_CHECKING-only imports count too: keep them one-way)."""
    graph = _project_imports(_modules(root))
    return sorted(
        f"{a} <-> {b}"
        for a, targets in graph.items()
        for b in targets
        if a < b and a in graph.get(b, ()) and not _is_package_of(a, b)
    )


def _is_package_of(a: str, b: str) -> bool:
    """A package's __init__ re-exporting its submodule, which imports a sibling through the package, is no cycle
    of two files we could untangle; only flag module <-> module pairs."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def long_functions(root: Path = ROOT) -> list[str]:
    out = []
    for name, path in _modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                is_kernel = any("jit" in ast.unparse(d) for d in node.decorator_list)
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not is_kernel:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return out


def big_classes(root: Path = ROOT) -> list[str]:
    out = []
    for name, path in _modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if len(methods) > MAX_METHODS:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({len(methods)} methods)")
    return out


def function_level_imports(root: Path = ROOT) -> list[str]:
    """Project imports inside functions without a `# lazy:` reason on the line."""
    out = []
    for name, path in _modules(root).items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = _resolve(name, node, path.name == "__init__.py")
                    is_project = any(n == PACKAGE or n.startswith(PACKAGE + ".") for n in names) or (
                        isinstance(node, ast.ImportFrom) and node.level
                    )
                    statement = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                    if is_project and "# lazy:" not in statement:
                        out.append(f"{path.relative_to(root)}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return out


CHECKS = {
    "import cycles": import_cycles,
    "functions over 60 lines": long_functions,
    "classes over 15 methods": big_classes,
    "function-level project imports": function_level_imports,
}


def main() -> int:
    failed = False
    for title, check in CHECKS.items():
        found = check()
        if found:
            failed = True
            print(f"{title}:")
            print("\n".join(f"  {line}" for line in found))
    if not failed:
        print("structure: ok")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
