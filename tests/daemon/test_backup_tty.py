"""`aegis backup` at a real pseudo-terminal: the passphrase is asked for (twice on export),
never echoed, and the progress of the long steps is shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .test_cli_tty import run_in_pty

PASS = "correct horse battery staple"
CHEAP = ["--kdf-memory-kib", "19456", "--kdf-passes", "2", "--kdf-lanes", "1"]


def _aegis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args], capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip


def test_export_and_import_at_a_terminal(short_tmp: Path) -> None:
    homes = [str(short_tmp / "a"), str(short_tmp / "b")]
    for h in homes:
        assert _aegis("init", "--home", h, "--no-passphrase").returncode == 0
        assert _aegis("daemon", "--detach", "--home", h).returncode == 0
    try:
        assert _aegis("name", "Alice at a tty", "--home", homes[0]).returncode == 0
        target = str(short_tmp / "tty.bak")
        # Weak: refused before the confirmation prompt, in a short line (issue 14, item 12).
        code, out = run_in_pty(
            ["backup", "export", target, "--home", homes[0], *CHEAP], ["too weak"] * 3
        )
        assert code == 1 and "Repeat for confirmation" not in out
        assert out.count("Backup passphrase") == 3
        last = out.strip().splitlines()[-1]
        assert last.startswith("aegis: error: the passphrase is too weak") and len(last) < 240
        assert not Path(target).exists()
        code, out = run_in_pty(
            ["backup", "export", target, "--home", homes[0], *CHEAP], [PASS, PASS]
        )
        assert code == 0, out
        assert "Backup passphrase" in out and "Repeat for confirmation" in out
        assert PASS not in out
        assert "deriving the key from the passphrase (Argon2id)" in out and "encrypting" in out
        assert "backup written to" in out
        code, out = run_in_pty(["backup", "import", target, "--home", homes[1]], [PASS])
        assert code == 0, out
        assert PASS not in out and "decrypting and checking" in out
        assert "restored 0 contacts" in out
        r = _aegis("status", "--home", homes[1], "--json")
        assert r.returncode == 0
        got = _aegis("name", "x", "--home", homes[1])  # the daemon still answers
        assert got.returncode == 0
    finally:
        for h in homes:
            _aegis("stop", "--home", h)
