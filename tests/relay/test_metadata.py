"""What the relay keeps and prints: no-logs scan, deleted rows, expiry with an injected clock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from nacl.public import PrivateKey

from relay import wire
from relay.app import RELAY_KEY, create_app
from relay.client import RelayClient, RelayError
from relay.config import Config
from relay.storage import owner_key

from . import relaydb
from .conftest import RelayProcess, run
from .helpers import block, new_owner, next_message
from .postgres import PostgresServer

CLIENT_ADDR = "127.0.0.2"


def forms(secret: bytes) -> list[bytes]:
    """The ways an ID could be written down: raw, hex (both cases), base64 (both alphabets)."""
    out = [secret, secret.hex().encode(), secret.hex().upper().encode(),
           base64.b64encode(secret).rstrip(b"="), base64.urlsafe_b64encode(secret).rstrip(b"=")]
    return out


def time_forms(t: int) -> list[bytes]:
    return [str(t).encode(), struct.pack(">q", t), struct.pack("<q", t),
            struct.pack(">d", float(t)), struct.pack("<d", float(t)),
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)).encode(),
            time.strftime("%Y-%m-%dT%H:%M", time.gmtime(t)).encode()]


def holds(data: bytes, needle: bytes) -> bool:
    """Whether `data` holds `needle`; a decimal number only as a whole number (not within a
    longer one: PostgreSQL's notification queue is full of decimal row keys, in which any
    5-digit port appears by chance)."""
    if not needle.isdigit():
        return needle in data
    return re.search(rb"(?<![0-9])" + needle + rb"(?![0-9])", data) is not None


def scan(paths: list[Path], needles: dict[str, list[bytes]]) -> list[str]:
    found = []
    for p in paths:
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            continue  # a server's temporary file (pg_internal.init...) gone since listed
        for label, variants in needles.items():
            for v in variants:
                if v and holds(data, v):
                    found.append(f"{label} in {p.parent.name}/{p.name}")
    return found


def stored_blocks(rp: RelayProcess, owner_id: bytes) -> list[bytes]:
    """The sealed blocks the running relay keeps for a mailbox (a read-only look at its DB)."""
    return [bytes(r[0]) for r in relaydb.query(
        rp, "SELECT block FROM messages JOIN mailboxes ON messages.mailbox = mailboxes.id"
        " WHERE owner_key = ?", owner_key(owner_id))]


@pytest.mark.both_backends
def test_no_logs_scan_from_127_0_0_2(relay_factory: Callable[..., RelayProcess],
                                     backend: str, request: pytest.FixtureRequest) -> None:
    rp = relay_factory(log_level="debug", checkpoint_interval=0.2)
    secrets: dict[str, list[bytes]] = {}
    times: list[int] = []
    ports: list[int] = []
    acked_sealed: list[bytes] = []
    acked_at_rest: list[bytes] = []
    deposited: list[bytes] = []

    def remember(label: str, value: bytes) -> None:
        secrets.setdefault(label, []).extend(forms(value))

    async def connect() -> RelayClient:
        c = await RelayClient.connect(rp.url, local_addr=(CLIENT_ADDR, 0))
        sockname = c.ws.get_extra_info("sockname")
        assert sockname[0] == CLIENT_ADDR
        ports.append(sockname[1])
        return c

    async def body() -> None:
        owner_c, sender, fetcher = await connect(), await connect(), await connect()
        token = os.urandom(32)
        alice = await new_owner(owner_c, token=token)
        bob = await new_owner(owner_c, public=True)
        for o in (alice, bob):
            remember("owner id", o.owner_id)
            remember("deposit id", o.deposit_id)
        remember("token", token)
        await owner_c.bundle_base(bob.owner_id, bob.sig, os.urandom(1482))
        await owner_c.bundle_add(bob.owner_id, bob.sig, wire.ITEM_X25519, [os.urandom(38)])
        await fetcher.bundle_fetch(bob.deposit_id)
        await alice.subscribe(owner_c)
        for i in range(6):
            b = block(bytes([i]))
            deposited.append(b)
            times.append(int(time.time()))
            if i % 2:
                await sender.deposit(bob.deposit_id, b)
            else:
                await sender.deposit(alice.deposit_id, b, token=token)
        # The copies at rest of the blocks about to be acknowledged (each delivery is sealed
        # afresh, so they are not the delivered bytes): they must not survive the ACK either.
        acked_at_rest.extend(stored_blocks(rp, alice.owner_id))
        assert len(acked_at_rest) == 3
        for _ in range(3):
            m = await next_message(owner_c)
            remember("msg id", m.msg_id)
            acked_sealed.append(m.sealed)
            await owner_c.ack([m.msg_id])
        queued = await bob.fetch(fetcher)  # left unacknowledged: stays queued
        assert len(queued) == 3
        # Blobs, and a few errors on the way.
        await sender.blob_quota(1)
        blob_id, cap = os.urandom(16), os.urandom(32)
        remember("blob id", blob_id)
        remember("blob cap", cap)
        b = block()
        deposited.append(b)
        await sender.blob_put(blob_id, cap, b)
        await fetcher.blob_get(blob_id, cap, PrivateKey.generate())
        for bad in (os.urandom(16), alice.owner_id):
            with contextlib.suppress(RelayError):
                await sender.deposit(bad, block(), token=os.urandom(32))
        # Bad HTTP from the same address: garbage, a plain GET of the WebSocket path, a 404.
        for raw in (b"GARBAGE\r\n\r\n", b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", rp.port,
                                                           local_addr=(CLIENT_ADDR, 0))
            ports.append(writer.get_extra_info("sockname")[1])
            writer.write(raw)
            await writer.drain()
            await asyncio.wait_for(reader.read(4096), 10)
            writer.close()
        times.append(int(time.time()))
        for c in (owner_c, sender, fetcher):
            await c.close()

    run(body())
    pg: PostgresServer | None = None
    if backend == "postgresql":
        pg = request.getfixturevalue("postgres_server")
        time.sleep(1.0)  # maintenance after the last write: VACUUM, WAL switch, CHECKPOINT
    assert rp.terminate() == 0
    needles = dict(secrets)
    needles["client address"] = [CLIENT_ADDR.encode(), bytes([127, 0, 0, 2]),
                                 b"127.000.000.002"]
    needles["client port"] = [str(p).encode() for p in ports]
    needles["arrival time"] = [f for t in range(times[0] - 1, times[-1] + 2)
                               for f in time_forms(t)]
    files = [p for p in rp.data.rglob("*") if p.is_file()]
    if pg is not None:
        # The database's files and the server's log (shared by this session's tests). Not for
        # the arrival times: PostgreSQL writes its own clock's (its start in postmaster.pid,
        # each checkpoint's in pg_control and the WAL, the log's lines), whatever clients do;
        # the commit times in the WAL are docs/threat-model.md's (§ PostgreSQL).
        assert not files  # the relay itself wrote nothing beside the database
        assert scan([rp.log_path], needles) == []
        # The server holds the databases of other tests of the session: this test's own, and
        # everything outside base/ (the WAL, notifications, statistics, the shared catalogs).
        db = rp.options["--store"].rsplit("/", 1)[1]
        oid = pg.query(f"SELECT oid FROM pg_database WHERE datname = '{db}'")[0][0]
        files = [p for p in pg.data.rglob("*") if p.is_file() and (
            p.parts[len(pg.data.parts)] != "base" or p.parent.name == str(oid))]
        found = scan([*files, pg.log_path],
                     {k: v for k, v in needles.items() if k != "arrival time"})
        assert found == [], found
    assert files, "the relay wrote nothing?"
    if pg is None:
        assert scan([*files, rp.log_path], needles) == []
    out = rp.output()
    assert "relay started" in out and "relay stopped" in out
    assert str(rp.port) not in out and "127.0.0" not in out
    # Deleted rows do not linger in free pages or the WAL; deposits are never stored as sent.
    gone = {"acknowledged block": [s[i:i + 48] for s in acked_sealed for i in (100, 8000)],
            "acknowledged block at rest": [s[i:i + 48] for s in acked_at_rest
                                           for i in (100, 8000)],
            "deposited bytes": [d[i:i + 48] for d in deposited for i in (100, 9000)]}
    assert scan(files, gone) == []


@pytest.mark.both_backends
def test_expiry_with_injected_clock(tmp_path: Path, store: str) -> None:
    now = [1_000_000.0]
    cfg = Config(data_dir=str(tmp_path / "data"), store=store, message_ttl=100,
                 expiry_granularity=10, sweep_interval=1e6, pow_deposit_bits=0)

    async def body() -> None:
        app = create_app(cfg, clock=lambda: now[0])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/v1/ws"
        relay = app[RELAY_KEY]
        try:
            c = await RelayClient.connect(url)
            token = os.urandom(32)
            o = await new_owner(c, token=token)
            early = [block(b"early1"), block(b"early2")]
            for b in early:
                await c.deposit(o.deposit_id, b, token=token)
            now[0] += 50
            late = block(b"late")
            await c.deposit(o.deposit_id, late, token=token)
            await c.close()

            async def queued() -> list[bytes]:
                c = await RelayClient.connect(url)
                try:
                    return [o.open(m) for m in await o.fetch(c)]
                finally:
                    await c.close()

            await relay.sweep()
            assert await queued() == [*early, late]
            now[0] += 60  # early blocks are past their (coarse) expiry, the late one is not
            await relay.sweep()
            assert await queued() == [late]
            now[0] += 100
            await relay.sweep()
            assert await queued() == []
        finally:
            await runner.cleanup()

    run(body())


def test_host_and_port_options(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import urllib.request

    from .conftest import ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "relay.main", "--host", "127.0.0.1",
                             "--port", str(port), "--data", str(tmp_path / "d")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0
    assert str(port) not in out and "127.0.0.1" not in out

