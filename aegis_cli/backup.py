"""``aegis backup export FILE`` and ``aegis backup import FILE`` (docs/backup.md).

The daemon does the work (key derivation, encryption, the file); this module asks for the
passphrase (never echoed), shows progress from ``backup.progress`` events on standard error,
and imports no cryptography. Registered by aegis_cli/main.py through ``register(module)``,
so that the commands use that module's helpers (and its error type) also under ``-m``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

import click

#: The format's defaults and floor (aegisd/core/backup.py; repeated: the CLI imports no
#: daemon internals). The daemon checks them again.
DEFAULT_MEMORY_KIB = 64 * 1024
DEFAULT_PASSES = 3
DEFAULT_LANES = 4

STAGES = {
    "kdf": "deriving the key from the passphrase (Argon2id)",
    "encrypt": "encrypting",
    "decrypt": "decrypting and checking",
    "write": "writing the file",
    "restore": "restoring",
}


class _Progress:
    """Print backup.progress events on stderr while a call runs (a terminal only)."""

    def __init__(self, main: ModuleType, ctx: Any, operation: str) -> None:
        self.enabled = not ctx.as_json and sys.stderr.isatty()
        self.operation = operation
        self.client: Any = None
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()  # the daemon's "done" event was seen
        if self.enabled:
            try:
                self.client = ctx.client(timeout=None)
                self.client.call("events.subscribe", {"types": ["backup.progress"]})
            except Exception:  # progress is a nicety: never a reason to fail
                self.enabled = False
                return
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        last = ""
        try:
            for note in self.client.notifications():
                data = (note.get("params") or {}).get("data") or {}
                if data.get("operation") != self.operation:
                    continue
                if data.get("stage") == "done":
                    self.finished.set()
                    return
                stage = STAGES.get(str(data.get("stage")), str(data.get("stage")))
                total = int(data.get("total") or 0)
                line = f"{stage} {100 * int(data.get('done') or 0) // total}%" if total else stage
                if line != last:
                    click.echo(f"\r{line}\033[K", err=True, nl=False)
                    last = line
        except Exception:
            return

    def close(self, ok: bool) -> None:
        if ok and self.thread is not None:
            self.finished.wait(5)  # the last progress lines, before the result
        if self.client is not None:
            # Shut the socket down first: that wakes the reading thread (closing its buffered
            # reader under it would wait for the read to end).
            with contextlib.suppress(OSError):
                self.client._sock.shutdown(socket.SHUT_RDWR)
            if self.thread is not None:
                self.thread.join(5)
            with contextlib.suppress(OSError, ValueError):
                self.client.close()
        if self.enabled:
            click.echo("\r\033[K", err=True, nl=False)


def _passphrase(main: ModuleType, passphrase_file: str | None, confirm: bool) -> str:
    """``confirm``: a new passphrase (export): the strength rule is checked first."""
    if passphrase_file:
        read = main.new_secret_from_file if confirm else main.read_secret_file
        return str(read(passphrase_file))
    return str(main.ask_secret("Backup passphrase", confirm=confirm, option="--passphrase-file"))


def register(main: ModuleType) -> None:
    cli = cast(click.Group, main.cli)
    common = cast(Callable[[Callable[..., None]], Callable[..., None]], main.common)
    fail = cast(type[Exception], main.Fail)

    @cli.group("backup")
    def backup() -> None:
        """Encrypted backups of the identity, contacts and history.

        The file is encrypted under a passphrase only you hold (Argon2id); ratchet sessions
        are not in it: after an import, every contact renews the session with the restored
        profile, and the old device stops receiving.
        """

    @backup.command("export")
    @common
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option("--passphrase-file", metavar="FILE",
                  help="Read the passphrase from FILE's first line ('-': standard input).")
    @click.option("--force", is_flag=True, help="Replace FILE if it exists.")
    @click.option(
        "--kdf-memory-kib", type=int, default=DEFAULT_MEMORY_KIB, show_default=True,
        metavar="KIB", help="Argon2id memory (at least 19456: RFC 9106 / OWASP floors).",
    )  # fmt: skip
    @click.option("--kdf-passes", type=int, default=DEFAULT_PASSES, show_default=True,
                  metavar="N", help="Argon2id passes (at least 2).")  # fmt: skip
    @click.option("--kdf-lanes", type=int, default=DEFAULT_LANES, show_default=True,
                  metavar="N", help="Argon2id lanes (parallelism).")  # fmt: skip
    def backup_export(
        ctx: Any,
        file: str,
        passphrase_file: str | None,
        force: bool,
        kdf_memory_kib: int,
        kdf_passes: int,
        kdf_lanes: int,
    ) -> None:
        """Write an encrypted backup of this profile to FILE (mode 0600).

        The passphrase must be strong (at least 10^12 guesses by zxcvbn's estimate: four or
        five random words are enough). FILE is not replaced without --force.
        """
        path = os.path.abspath(file)
        if os.path.exists(path) and not force:
            raise fail(f"{file} exists; choose another name or use --force")
        with ctx.client() as c:  # the daemon answers before we ask for a passphrase
            c.call("status")
        passphrase = _passphrase(main, passphrase_file, confirm=True)
        progress = _Progress(main, ctx, "export")
        try:
            with ctx.client(timeout=3600) as c:
                result = c.call(
                    "backup.export",
                    {
                        "path": path, "passphrase": passphrase, "force": force,
                        "kdf_memory_kib": kdf_memory_kib, "kdf_passes": kdf_passes,
                        "kdf_lanes": kdf_lanes,
                    },
                )  # fmt: skip
        except BaseException:
            progress.close(False)
            raise
        progress.close(True)
        ctx.out(
            result,
            f"backup written to {result['path']}: {result['contacts']} contacts, "
            f"{result['messages']} messages, {result['bytes']} bytes",
        )

    @backup.command("import")
    @common
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option("--passphrase-file", metavar="FILE",
                  help="Read the passphrase from FILE's first line ('-': standard input).")
    def backup_import(ctx: Any, file: str, passphrase_file: str | None) -> None:
        """Restore a backup into this profile, which must be fresh (no contacts or history).

        Create the profile first (aegis init --home DIR --relay URL, aegis daemon). Each
        contact then renews its session with this profile over new mailboxes; `aegis
        contacts` shows them as established again once they answered.
        """
        path = os.path.abspath(file)
        if not os.path.isfile(path):
            raise fail(f"{file} is not a file")
        with ctx.client() as c:
            c.call("status")
        passphrase = _passphrase(main, passphrase_file, confirm=False)
        progress = _Progress(main, ctx, "import")
        try:
            with ctx.client(timeout=3600) as c:
                result = c.call("backup.import", {"path": path, "passphrase": passphrase})
        except BaseException:
            progress.close(False)
            raise
        progress.close(True)
        ctx.out(
            result,
            f"restored {result['contacts']} contacts and {result['messages']} messages; "
            f"renewing the session with {result['renewing']} contacts",
        )
