"""`aegis-relay`: run the relay.

Output is deliberately poor: fixed lines ("relay started", "relay stopping", ...) with no time,
address, port, ID or count. aiohttp's access log is off and its own loggers are silenced, since
their messages can carry peer addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import click
from aiohttp import web

from .app import RELAY_KEY, create_app
from .config import Config
from .storage import StorageError

log = logging.getLogger("aegis.relay")

# Connections the kernel queues until the relay accepts them. Under a connection flood a short
# queue drops honest clients' SYNs (a retry a second later); the kernel caps it at somaxconn.
BACKLOG = 1024
#: Allocations between two young garbage collections (Python's default: 700).
YOUNG_GC = 10_000

HELP = {
    "message_ttl": "Seconds before an unacknowledged block expires (14 days).",
    "expiry_granularity": "Stored expiries are rounded up to this many seconds.",
    "sweep_interval": "Seconds between expiry sweeps.",
    "checkpoint_interval": "Seconds between WAL checkpoints (truncate).",
    "pow_deposit_bits": "Proof-of-work bits for a deposit to a public mailbox without token.",
    "pow_bundle_bits": "Proof-of-work bits for an anonymous prekey bundle fetch.",
    "pow_blob_bits": "Proof-of-work bits per 256 blocks (4 MiB) of a blob quota.",
    "pow_create_bits": "Proof-of-work bits for creating a mailbox.",
    "max_frame": "Largest accepted frame in bytes (bigger: WebSocket close 1009).",
    "max_connections": ("Concurrent connections, counted from the TCP accept; a newcomer then "
                        "takes the place of one from the source holding most (relay/gate.py), "
                        "else is refused (HTTP 503)."),
    "source_connections": ("Connections one source address (IPv6: /64) may hold, before the "
                           "upgrade too (0: no cap); loopback is exempt by default."),
    "source_cap_loopback": "Apply --source-connections to loopback peers too.",
    "delete_keys": "Accept mailboxes with a delete-only key (CREATE flags bit 1); false: refuse "
                   "them with bad_frame as a relay before delete keys does, so that only the "
                   "owner key can delete a mailbox (clients fall back to CREATE without one).",
    "handshake_timeout": "Seconds for a new connection to upgrade and send HELLO.",
    "setups_per_turn": ("New connections handed to the HTTP server per turn of the event loop, "
                        "in arrival order; the rest wait (0: no bound)."),
    "idle_timeout": "Seconds a connection without subscription may stay silent.",
    "subscribed_idle_timeout": "Seconds a subscribed connection may send nothing (no ping).",
    "ping_interval": "Seconds between WebSocket pings.",
    "max_inflight": "Concurrent requests per connection (reading pauses beyond).",
    "conn_buffer": "Bytes waiting for one client at most (reading and pushing pause beyond).",
    "conn_sndbuf": "Kernel send buffer per accepted socket in bytes (0: the system's).",
    "stall_timeout": "Seconds a client may stay above --conn-buffer before it is closed.",
    "frame_rate": "Frames per second per connection (token bucket rate).",
    "frame_burst": "Frame bucket size per connection.",
    "max_mailboxes": "Mailboxes the relay holds at most.",
    "mailbox_ttl": "Seconds after its owner's last use before a mailbox is deleted (90 days).",
    "mailbox_use_granularity": "A mailbox's last use is stored rounded down to this (30 days).",
    "creates_per_connection": "Mailboxes one connection may create.",
    "subscriptions_per_connection": "Subscriptions one connection may hold.",
    "queue_limit": "Blocks queued per mailbox.",
    "window": "Unacknowledged blocks in flight per mailbox and connection.",
    "deposit_rate": "Deposits per second per mailbox (token bucket rate; with --store "
                    "postgresql:// relay-wide: each of N live nodes applies 1/N, its burst too).",
    "deposit_burst": "Deposit bucket size per mailbox.",
    "tokens_per_mailbox": "Send-capability tokens per mailbox.",
    "bundle_items_per_kind": "One-time prekey items per kind and mailbox.",
    "bundle_fetch_rate": "One-time prekey items handed out per second per mailbox (beyond: "
                         "the bundle base alone; relay-wide, as --deposit-rate).",
    "bundle_fetch_burst": "One-time item bucket size per mailbox.",
    "bundle_fetches_per_connection": "Bundle fetches one connection may make.",
    "blob_quota_blocks": "Blob blocks one proof-of-work quota admits.",
    "blob_quota_idle": "Seconds without a put after which a blob quota is released.",
    "blob_quota_lifetime": "Seconds after its grant at which a blob quota is released.",
    "blob_max_bytes": "Bytes the blob area holds at most.",
    "blob_ttl": "Seconds before an unfetched blob expires (48 hours).",
    "storage_budget": "Bytes of queued blocks and blobs the relay stores at most "
                      "(0: half of the free space plus the relay's files, at start).",
    "crowded_fraction": "Fraction of --storage-budget above which long queues refuse deposits.",
    "crowded_queue_limit": "Blocks a mailbox may hold while the storage budget is crowded.",
    "pow_per_connection": "Proofs of work one connection may spend.",
    "lookup_rate": "Uncached mailbox lookups per second per connection.",
    "lookup_burst": "Uncached mailbox lookup bucket size per connection.",
    "store": "Storage: empty for SQLite in --data; postgresql://... for a database several "
             "relay nodes share (each node then counts caps in the database).",
    "pg_rewrite_rows": "PostgreSQL: a table of at most this many rows is rewritten (VACUUM "
                       "FULL) at every checkpoint, so deleted blocks leave its files.",
    "pg_notify_batch_ms": "PostgreSQL: deposits committed within this many ms are announced "
                          "to the other nodes in one notification (0: one each, in the "
                          "deposit's commit).",
    "max_batch": "Storage operations per group commit.",
    "max_batch_bytes": "Bytes written per group commit at most (about; one operation at least).",
    "checkpoint_bytes": "Bytes committed between background WAL checkpoints (0: off).",
    "disk_reserve": "Bytes of disk held in reserve, released when the disk fills.",
    "max_db_bytes": "Largest database in bytes (0: the disk); reaching it is a full disk.",
    "max_pending_writes": "Storage operations waiting at most; beyond, deposits get busy.",
    "fair_load": "Storage operations waiting relay-wide from which each connection gets a "
                 "fair share (0: off).",
    "fair_share": "Storage operations of one connection waiting, under --fair-load, from "
                  "which its next deposit or blob put, and its reading, wait.",
}


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("aegis-relay: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(getattr(logging, level.upper()))
    for name in ("aiohttp", "aiohttp.access", "aiohttp.server", "aiohttp.web",
                 "aiohttp.websocket", "aiohttp.internal", "aiohttp.client", "asyncio",
                 # asyncpg's pool logs tracebacks while the database is away: the relay's own
                 # lines (maintenance failed: TYPE) say it without them.
                 "asyncpg", "asyncpg.pool"):
        lg = logging.getLogger(name)
        lg.disabled = True
        lg.propagate = False


def _raise_nofile() -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _freeze_start_up_objects() -> None:
    """Move what start-up built (modules, classes, the app) out of the collector's sight: a
    full collection walks every tracked object, and these, about 40,000, never become garbage.
    Under a connection flood full collections come every few seconds while the held
    connections grow, and each stalls every client. Measured once each way with a gc.callbacks
    probe in bench/attack.py 3t: 77 ms during the attacker's ramp (118,000 objects) became 41 ms
    (60,000), and 96 ms as its connections closed became 64 ms."""
    gc.collect()
    gc.freeze()
    # A young collection every YOUNG_GC allocations instead of 700. A connection flood allocates
    # tens of thousands of long-lived objects a second; with Python's thresholds every 7,000 of
    # them reach the middle generation and every 70,000 may start a full collection (one per
    # ramp of 1000 connections, 20 to 60 ms). With these a full one comes at most once per
    # 1,000,000 allocations, a middle one once per 100,000 (one during such a ramp, 35 to
    # 136 ms, walking only what survived since the last: bounded however many connections are
    # held), and a young one takes a few milliseconds; cyclic garbage waits a little longer.
    # bench/attack.py 3t: p99 0.8x to 2.2x over ten runs, 1.2x to 4.1x without it (threat model
    # §4.7).
    gc.set_threshold(YOUNG_GC, *gc.get_threshold()[1:])


async def serve(app: web.Application, host: str, port: int, sock: socket.socket | None) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    # Count and time connections from the TCP accept, before any HTTP (relay/gate.py): the
    # gate's protocol comes first, aiohttp's handler only for a connection it does not abort.
    assert runner.server is not None
    factory = app[RELAY_KEY].gate.install(runner.server)
    loop = asyncio.get_running_loop()
    if sock is not None:
        listener = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
    else:
        listener = await loop.create_server(factory, host, port, backlog=BACKLOG)
    _freeze_start_up_objects()
    log.info("relay started")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relay stopping")
    listener.close()  # no new connections; the open ones are closed below (1001)
    await runner.cleanup()
    log.info("relay stopped")


def _run(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise click.UsageError("--event-loop uvloop: uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _option(field: dataclasses.Field[Any]) -> Any:
    default = field.default
    return click.option("--" + field.name.replace("_", "-"), field.name, type=type(default),
                        default=default, show_default=True, help=HELP.get(field.name, ""))


def _command() -> click.Command:
    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=8765, show_default=True, type=int, help="TCP port.")
    @click.option("--listen-fd", type=int, default=None,
                  help="Serve on this inherited, already listening socket instead.")
    @click.option("--data", "data_dir", default="./relay-data", show_default=True,
                  help="Data directory (SQLite database).")
    @click.option("--log-level", default="info", show_default=True,
                  type=click.Choice(["debug", "info", "warning", "error"]))
    @click.option("--event-loop", default="auto", show_default=True,
                  type=click.Choice(["auto", "uvloop", "asyncio"]),
                  help="Event loop: uvloop (libuv; accepts, reads and writes cost less, which "
                       "matters under a connection flood) or Python's own; auto: uvloop if "
                       "installed.")
    def command(host: str, port: int, listen_fd: int | None, log_level: str,
                event_loop: str, **options: Any) -> None:
        """aegis-relay: metadata-blind store-and-forward relay (docs/relay-protocol.md).

        TLS is left to a reverse proxy (contrib/relay/). The relay logs no address, port, ID,
        time or count.
        """
        _setup_logging(log_level)
        _raise_nofile()
        cfg = Config(**options)
        sock = None
        if listen_fd is not None:
            sock = socket.socket(fileno=listen_fd)
            sock.setblocking(False)
        try:
            _run(serve(create_app(cfg), host, port, sock), event_loop)
        except OSError as exc:
            log.error("cannot serve: %s", exc.strerror or type(exc).__name__)
            sys.exit(1)
        except StorageError as exc:  # its text is fixed or an exception's type name
            log.error("cannot open the store: %s", exc)
            sys.exit(1)

    for field in dataclasses.fields(Config):
        if field.name != "data_dir":
            command = _option(field)(command)
    return command


def main() -> None:
    _command()(prog_name="aegis-relay")


if __name__ == "__main__":
    main()
