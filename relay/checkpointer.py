"""Background WAL checkpoints for the relay's SQLite store, off the writer thread.

SQLite's automatic checkpoint runs inside the COMMIT that makes the WAL cross its threshold: that
commit copies the whole WAL into the database file and fsyncs it (20 to 45 ms for the 32 MiB WAL
of the default disk reserve, measured during a blob flood with `bench/attack.py --scenario 6`),
and every deposit sharing the batch waits for it. Here a thread with a connection of its own runs
PASSIVE checkpoints (which never block the writer: SQLite allows one checkpointer beside one
writer in WAL mode) whenever the writer has committed `every_bytes` since the last one. The
writer keeps its automatic checkpoint as a fallback, for when this thread falls behind: it then
finds most frames already copied. The WAL restarts from its beginning at the first write after a
checkpoint that copied every frame, as before.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("aegis.relay")


class Checkpointer:
    """Runs `PRAGMA wal_checkpoint(PASSIVE)` on its own thread when asked (`wrote`)."""

    def __init__(self, path: str, every_bytes: int) -> None:
        self._path = path
        self._every = every_bytes
        self._written = 0  # by the writer thread only
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Checkpoints run so far (for tests and probes).
        self.runs = 0

    def start(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._thread = threading.Thread(target=self._loop, args=(db,), daemon=True,
                                        name="relay-checkpoint")
        self._thread.start()

    def wrote(self, nbytes: int) -> None:
        """The writer committed about `nbytes`: checkpoint once enough has accumulated."""
        self._written += nbytes
        if self._written >= self._every:
            self._written = 0
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self, db: sqlite3.Connection) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except sqlite3.Error as exc:
                    # Busy (the writer's own checkpoint holds the lock) or a full disk: the
                    # writer's checkpoints and its full-disk handling cover both.
                    log.debug("storage: background checkpoint skipped (%s)",
                              type(exc).__name__)
        finally:
            db.close()
