"""Between relay nodes sharing one PostgreSQL database (docs/relay-protocol.md §8.1): what they
announce to each other on channel `aegis_relay` (LISTEN/NOTIFY), the batching of deposits'
announcements, and how a node knows which nodes live (their listening connections, the
heartbeat rows of `relay_nodes`). Used by relay/storage_pg.py, which holds the pool.

Payloads are a kind letter and random row keys (or a listening connection's server process id)
only: nothing about a client (docs/threat-model.md §4.11).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg

CHANNEL = "aegis_relay"
# A notification's payload is at most 8000 bytes (PostgreSQL's limit): `d` and up to 390 keys
# of at most 19 digits with their commas.
PAYLOAD_KEYS = 390
# The listening connections carry this name, so that a node sees another node go away
# (Listener.check).
LISTENER_NAME = "aegis-relay listen"

# What counts as the database being away (restarted, unreachable): the operation failed.
AWAY = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError, asyncpg.CannotConnectNowError)


def payloads(kind: str, keys: list[int]) -> list[str]:
    return [kind + ",".join(map(str, keys[i:i + PAYLOAD_KEYS]))
            for i in range(0, len(keys), PAYLOAD_KEYS)]


async def notify(con: asyncpg.Connection, kind: str, key: int) -> None:
    # Delivered at commit, and only if the transaction commits.
    await con.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{kind}{key}")


async def heartbeat(con: asyncpg.Connection, node: int, ttl: int, announce: bool) -> int:
    """In one transaction: mark `node` live for `ttl` seconds (rounded up to a third of it, by
    the database's clock: the nodes' own clocks may differ), drop the rows of nodes that
    stopped beating (and then notify `n0`, as `announce` does), and count the live ones."""
    grain = max(1, ttl // 3)
    now = int(await con.fetchval("SELECT extract(epoch FROM now())::bigint"))
    expired = await con.execute("DELETE FROM relay_nodes WHERE expires < $1", now)
    await con.execute(
        "INSERT INTO relay_nodes (node, expires) VALUES ($1, $2)"
        " ON CONFLICT (node) DO UPDATE SET expires = excluded.expires",
        node, -(-(now + ttl) // grain) * grain)
    # A node killed without retiring: every node counts again now, not at its sweep.
    if announce or expired != "DELETE 0":
        await notify(con, "n", 0)
    return int(await con.fetchval("SELECT count(*) FROM relay_nodes"))


async def retire(con: asyncpg.Connection, node: int) -> None:
    await con.execute("DELETE FROM relay_nodes WHERE node = $1", node)
    await notify(con, "n", 0)


class Announcer:
    """Committed deposits announced in batches: those committed within `window` seconds of
    the first go in one notifying transaction, at most one such transaction at a time."""

    def __init__(self, window: float, pool: Callable[[], asyncpg.Pool | None]) -> None:
        self._window = window
        self._pool = pool
        # Mailboxes whose committed deposits this node has not announced yet (in order), with
        # their number of such deposits, and the task announcing them.
        self._unannounced: dict[int, int] = {}
        self.task: asyncio.Task[None] | None = None
        self._closing = False
        self._closing_now = asyncio.Event()

    def deposit(self, mailbox: int) -> None:
        """After a deposit's commit: announce it with the others of the next few ms."""
        self._unannounced[mailbox] = self._unannounced.get(mailbox, 0) + 1
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._announce_batches())

    async def close(self) -> None:
        """What was committed is announced before leaving (bounded: the database may be away;
        the other nodes then read their queues again as this node's listener goes)."""
        self._closing = True
        self._closing_now.set()
        if self.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 5)

    async def _announce_batches(self) -> None:
        # One notifying transaction at a time per node: the deposits committed meanwhile
        # gather for the next one.
        while self._unannounced:
            if not self._closing:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closing_now.wait(), self._window)
            # A mailbox's key once per block, as unbatched: the nodes count its blocks.
            keys = [k for k, n in self._unannounced.items() for _ in range(n)]
            waiting, self._unannounced = self._unannounced, {}
            try:
                pool = self._pool()
                if pool is None:
                    return
                async with pool.acquire(timeout=10) as con:
                    await con.execute(
                        "SELECT pg_notify($1, p) FROM unnest($2::text[]) p", CHANNEL,
                        payloads("d", keys))
            except (asyncpg.PostgresError, *AWAY):
                # Not announced: again, until the database answers (or this node closes).
                for k, n in waiting.items():
                    self._unannounced[k] = self._unannounced.get(k, 0) + n
                if self._closing:
                    return
                await asyncio.sleep(0.5)


class Listener:
    """The node's listening connection: what the other nodes announce, and whether one of
    them went away (its listening connection gone) since the last check."""

    def __init__(self, dsn: str, settings: dict[str, str], own_pids: set[int]) -> None:
        self._dsn = dsn
        self._settings = {**settings, "application_name": LISTENER_NAME}
        # The server process ids of this node's pool: its own notifications.
        self._own_pids = own_pids
        self.connection: asyncpg.Connection | None = None
        self._watch: Callable[[str, int], None] | None = None
        # The nodes' listening connections seen last (server process ids), with those
        # announced since (`n<pid>`), and when pg_stat_activity was last read.
        self._nodes: set[int] = set()
        self._nodes_checked = 0.0

    def watch(self, callback: Callable[[str, int], None]) -> None:
        self._watch = callback

    async def listen(self) -> None:
        con = await asyncpg.connect(self._dsn, server_settings=self._settings, timeout=10)
        await con.add_listener(CHANNEL, self._notified)
        self.connection = con
        # Before the node serves, once it hears: the other nodes add this listening connection
        # to those they watch, even if it is gone before they next read pg_stat_activity (a
        # node killed within a second of its start still has its deposits read again).
        await con.execute("SELECT pg_notify($1, $2)", CHANNEL, f"n{con.get_server_pid()}")

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close(timeout=5)
            self.connection = None

    def _notified(self, con: Any, pid: int, _channel: str, payload: str) -> None:
        if pid in self._own_pids or pid == con.get_server_pid():
            return  # this node's own: already acted upon
        try:
            kind, keys = payload[0], [int(k) for k in payload[1:].split(",")]
        except (IndexError, ValueError):
            return
        if kind == "n" and keys[0] > 0:
            self._nodes.add(keys[0])  # a node's listening connection, watched from now
        if self._watch is None:
            return
        for key in keys:
            self._watch(kind, key)

    async def check(self) -> str | None:
        """Make the listening connection again if it was lost ("resumed"), or say that another
        node's listening connection went away ("node_gone": a node that died between a
        deposit's commit and its batch never announced it). Either way the caller reads the
        subscribed queues again; None: nothing was missed."""
        if self.connection is not None and not self.connection.is_closed():
            return "node_gone" if await self._node_gone() else None
        try:
            await self.listen()
        except (asyncpg.PostgresError, *AWAY):
            return None
        self._nodes = set()
        return "resumed"

    async def _node_gone(self) -> bool:
        # Whatever this node's own window: another node's may be longer.
        if self.connection is None:
            return False
        now = time.monotonic()
        if now - self._nodes_checked < 1.0:
            return False
        self._nodes_checked = now
        try:
            pids = {int(r[0]) for r in await self.connection.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
                " AND datname = current_database()", LISTENER_NAME)}
        except (asyncpg.PostgresError, *AWAY):
            return False  # the listener is lost: the next call makes it again
        gone = not self._nodes <= pids
        self._nodes = pids
        return gone
