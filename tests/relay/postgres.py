"""A real PostgreSQL server for the relay's tests: Debian's binaries (`make test` installs the
postgresql package), its own data directory under a temporary directory, listening on
127.0.0.1 on a port of its own and on a unix socket in that directory, started once per test
session. PostgreSQL refuses to run as root: as root the server runs as `nobody`.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import asyncpg


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server's programs out of PATH, one directory per major version.
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One server; `new_database()` gives each test a database of its own."""

    #: Settings the relay's design counts on (contrib/relay/postgresql.conf says why): WAL
    #: segments are removed, not recycled, once a checkpoint no longer needs them.
    SETTINGS: ClassVar[dict[str, str]] = {
        "wal_recycle": "off", "min_wal_size": "32MB", "max_wal_size": "64MB",
        "synchronous_commit": "on", "fsync": "on", "log_min_messages": "warning",
        "max_connections": "200", "shared_buffers": "32MB"}

    def __init__(self) -> None:
        initdb, postgres = find_bin("initdb"), find_bin("postgres")
        if initdb is None or postgres is None:
            raise FileNotFoundError("PostgreSQL's initdb and postgres (Debian: postgresql)")
        self.postgres = postgres
        self.root = Path(tempfile.mkdtemp(prefix="aegis-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.sockdir.mkdir()
        self.as_user: dict[str, str] = {}
        if os.geteuid() == 0:
            self.as_user = {"user": "nobody", "group": "nogroup"}
            for p in (self.root, self.sockdir):
                shutil.chown(p, "nobody", "nogroup")
        self.port = _free_port()
        self.log_path = self.root / "postgres.log"
        subprocess.run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-instructions"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       **self.as_user)  # type: ignore[call-overload]
        # The settings contrib/relay/postgresql.conf gives operators, as they would add them
        # (copied in: the server's user may not read the checkout); SETTINGS override a few.
        contrib = Path(__file__).resolve().parents[2] / "contrib" / "relay" / "postgresql.conf"
        conf = self.data / "aegis-relay.conf"
        shutil.copyfile(contrib, conf)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\ninclude 'aegis-relay.conf'\n")
        if self.as_user:
            shutil.chown(conf, "nobody", "nogroup")
        self.proc: subprocess.Popen[bytes] | None = None
        self._dbs = itertools.count()
        self.start()

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        args = [self.postgres, "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self.sockdir)]
        for k, v in self.SETTINGS.items():
            args += ["-c", f"{k}={v}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     **self.as_user)  # type: ignore[call-overload]
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited:\n" + self.log_path.read_text())
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                asyncio.run(self.aquery("SELECT 1"))
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not start:\n" + self.log_path.read_text())

    def stop(self, immediate: bool = False) -> None:
        """Stop the server: `immediate` as a crash (no shutdown checkpoint), else cleanly."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        self.proc.wait(60)

    async def aquery(self, sql: str, db: str = "postgres") -> list[asyncpg.Record]:
        con = await asyncpg.connect(self.dsn(db), timeout=5)
        try:
            return list(await con.fetch(sql))
        finally:
            await con.close()

    def query(self, sql: str, db: str = "postgres") -> list[asyncpg.Record]:
        return asyncio.run(self.aquery(sql, db))

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        name = f"relay{next(self._dbs)}"
        self.query(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
