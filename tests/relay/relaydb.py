"""The database of a relay under test, read (or altered) by the test on either backend: the
SQLite file in its --data directory, or its PostgreSQL database (--store). SQL is written with
`?` placeholders, as sqlite3 takes them; for PostgreSQL they become $1, $2, ..."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import re
import sqlite3
from typing import TYPE_CHECKING, Any

import asyncpg

if TYPE_CHECKING:
    from .conftest import RelayProcess

_THREAD = concurrent.futures.ThreadPoolExecutor(1)


def _numbered(sql: str) -> str:
    n = itertools.count(1)
    return re.sub(r"\?", lambda _m: f"${next(n)}", sql)


async def _pg(dsn: str, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        return [tuple(r) for r in await con.fetch(_numbered(sql), *args)]
    finally:
        await con.close()


def query(rp: RelayProcess, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of `sql` (a write is committed); callable inside or outside an event loop."""
    store = rp.options.get("--store")
    if store:
        coro = _pg(store, sql, args)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        return _THREAD.submit(asyncio.run, coro).result()
    path = rp.data / "relay.sqlite3"
    writes = not sql.lstrip().upper().startswith("SELECT")
    db = sqlite3.connect(path if writes else f"file:{path}?mode=ro", uri=not writes)
    try:
        rows = [tuple(r) for r in db.execute(sql, args).fetchall()]
        db.commit()
        return rows
    finally:
        db.close()


def count(rp: RelayProcess, table: str) -> int:
    return int(query(rp, f"SELECT count(*) FROM {table}")[0][0])


def stored_blocks(rp: RelayProcess, owner_key: bytes) -> list[bytes]:
    """A mailbox's queued blocks as the relay's own at-rest box holds them, in queue order (on
    PostgreSQL, opened from the database's encryption at rest: docs/relay-protocol.md §8.1)."""
    if not rp.options.get("--store"):
        return [bytes(r[0]) for r in query(
            rp, "SELECT block FROM messages JOIN mailboxes ON messages.mailbox = mailboxes.id"
            " WHERE owner_key = ? ORDER BY seq", owner_key)]
    from relay.storage_pg import unseal
    return [unseal(bytes(secret), bytes(block)) for block, secret in query(
        rp, "SELECT m.block, k.secret FROM messages m JOIN message_keys k ON k.id = m.id"
        " JOIN mailboxes b ON m.mailbox = b.id WHERE b.owner_key = ? ORDER BY m.seq",
        owner_key)]
