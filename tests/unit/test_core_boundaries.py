"""The protocol core is pure: no I/O, no clock, no event loop; and it is the only messaging
code that imports cryptographic primitives directly (primitives.py within it)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "aegisd" / "core"
FORBIDDEN_MODULES = {
    "asyncio", "socket", "ssl", "select", "selectors", "sqlite3", "sqlcipher3", "aiohttp",
    "time", "datetime", "pathlib", "io", "shutil", "tempfile", "subprocess", "threading",
    "logging", "random", "secrets", "urllib", "http",
}  # fmt: skip
FORBIDDEN_CALLS = {"open", "print", "input"}


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_has_no_io() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        tree = ast.parse(path.read_text())
        bad = _imports(tree) & FORBIDDEN_MODULES
        assert not bad, f"{path.name} imports {bad}"
        calls = {
            n.func.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert not calls & FORBIDDEN_CALLS, f"{path.name} calls {calls & FORBIDDEN_CALLS}"
        if path.name != "primitives.py":
            assert "os" not in _imports(tree), f"{path.name}: only primitives.py reads os.urandom"


def test_only_primitives_and_key_holders_import_cryptography() -> None:
    allowed = {"primitives.py", "identity.py", "prekeys.py", "ratchet.py", "pqxdh.py"}
    for path in CORE.glob("*.py"):
        if "cryptography" in _imports(ast.parse(path.read_text())):
            assert path.name in allowed, path.name
    assert "cryptography" not in _imports(ast.parse((CORE / "wire.py").read_text()))
