"""The package's structure rules (tools/check_structure.py) hold, and the checker itself catches what it names."""

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_structure", ROOT / "tools" / "check_structure.py")
check_structure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_structure)


@pytest.mark.parametrize("name", list(check_structure.CHECKS))
def test_the_package_keeps_the_rule(name):
    assert check_structure.CHECKS[name]() == []


def test_the_checker_sees_cycles_long_functions_big_classes_and_lazy_imports(tmp_path):
    pkg = tmp_path / "longreach"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from longreach import b\n")
    (pkg / "b.py").write_text("import longreach.a\n")
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    methods = "\n".join(f"    def m{i}(self):\n        return {i}" for i in range(16))
    (pkg / "c.py").write_text(f"def long():\n{body}\n\n\nclass Big:\n{methods}\n")
    (pkg / "d.py").write_text(
        textwrap.dedent("""
        def f():
            from longreach import a
            from longreach import b  # lazy: optional heavy dependency
            return a, b
        """)
    )
    assert check_structure.import_cycles(tmp_path) == ["longreach.a <-> longreach.b"]
    assert [s.split()[-3] for s in check_structure.long_functions(tmp_path)] == ["long"]
    assert check_structure.big_classes(tmp_path) == ["longreach/c.py:65 Big (16 methods)"]
    assert check_structure.function_level_imports(tmp_path) == ["longreach/d.py:3 from longreach import a"]
