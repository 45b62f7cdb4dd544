"""What the CLI loads: no command but ``aegis chat`` imports Textual, and no command imports
cryptography, a database or a network library (the daemon holds them); the chat client's
own modules import only Textual, aegis_client and the standard library."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from pathlib import Path

CHAT = Path(__file__).resolve().parents[2] / "aegis_cli" / "chat"
HEAVY = ("cryptography", "nacl", "sqlcipher3", "sqlite3", "aiohttp", "aiortc", "argon2")
STDLIB_USED = {
    "__future__", "asyncio", "collections", "contextlib", "dataclasses", "os", "pathlib",
    "shlex", "signal", "time", "typing",
}  # fmt: skip


def _loaded_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return set(out.split())


def test_aegis_help_loads_no_textual_and_nothing_heavy() -> None:
    loaded = _loaded_after(
        "import sys\nfrom click.testing import CliRunner\nfrom aegis_cli.main import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\nassert r.exit_code == 0 and 'chat' in r.output"
    )
    assert "textual" not in loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_the_chat_client_loads_textual_and_nothing_heavy() -> None:
    loaded = _loaded_after("import aegis_cli.chat.app")
    assert "textual" in loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_chat_modules_import_only_textual_and_aegis_client() -> None:
    files = sorted(CHAT.glob("*.py"))
    assert len(files) >= 5
    # Finalizers of objects an earlier test left (an aiohttp response whose loop is closed)
    # run now, not inside ast.parse: CPython 3.11.7 fails the parse when one raises there
    # ("AST constructor recursion depth mismatch").
    gc.collect()
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            bad = roots - {"textual", "aegis_client"} - STDLIB_USED
            assert not bad, f"{path.name} imports {bad}"
