"""Relay benchmark: throughput and deposit-to-delivery latency against a bare forwarder.

    .venv/bin/python bench/relay.py [--pairs 50] [--messages 200] [--inflight 8] [--idle 5000]
                                    [--store postgresql]

N sender/receiver pairs on loopback: each sender deposits M blocks of the protocol's block size
(at most `--inflight` awaiting their acknowledgement), each receiver is subscribed and
acknowledges what it gets. The same workload runs, in the same run, against:

  * aegis-relay (a subprocess: SQLite WAL, synchronous=FULL, group commit, re-encryption), and
  * a bare aiohttp WebSocket forwarder (a subprocess: no storage, no checks, no crypto), the
    ceiling;
  * with `--store postgresql`, also aegis-relay on PostgreSQL: one node, and two nodes on one
    database with half the pairs' sender and receiver on different nodes (their latency also
    printed apart), each with its deposits announced in batches (`--pg-notify-batch-ms`) and
    one by one (0); and how long the maintenance's rewrite of the key table takes at 100,000
    rows.

It prints deposits per second and p50/p99 latency for both and the ratio; then it opens
`--idle` connections to a fresh relay, each subscribed to its own mailbox, and prints the relay's
resident memory. Nothing here is asserted: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from nacl.public import PrivateKey
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relay import wire  # noqa: E402
from relay.client import RelayClient  # noqa: E402

BLOCK = wire.BLOCK_SIZE


# --- the bare forwarder (the ceiling) -------------------------------------------------------------


def forwarder_main(fd: int) -> None:
    """Frames: 0x00|name(16) subscribes; 0x01|rid(4)|name(16)|block is forwarded, then acked."""
    subs: dict[bytes, web.WebSocketResponse] = {}

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20, compress=False)
        await ws.prepare(request)
        async for msg in ws:
            data = msg.data
            if data[0] == 0:
                subs[data[1:17]] = ws
            else:
                target = subs.get(data[5:21])
                if target is not None:
                    await target.send_bytes(data[21:])
                await ws.send_bytes(data[1:5])
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    sock = socket.socket(fileno=fd)
    web.run_app(app, sock=sock, print=None, access_log=None)


# --- processes ---------------------------------------------------------------------------------


class Server:
    def __init__(self, args: list[str]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        fd = str(self.sock.fileno())
        self.proc = subprocess.Popen([a.replace("{fd}", fd) for a in args], cwd=ROOT,
                                     pass_fds=(self.sock.fileno(),), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    async def wait_ready(self, path: str) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(500):
                if self.proc.poll() is not None:
                    raise RuntimeError("server exited")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with s.get(f"http://127.0.0.1:{self.port}{path}") as r:
                        if r.status < 500:
                            return
                await asyncio.sleep(0.02)
        raise RuntimeError("server did not start")

    def rss_mb(self) -> tuple[float, float]:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def start_relay(data: str, store: str = "", batch_ms: float | None = None) -> Server:
    extra = [] if batch_ms is None else ["--pg-notify-batch-ms", str(batch_ms)]
    return Server([sys.executable, "-m", "relay.main", "--listen-fd", "{fd}", "--data", data,
                   "--store", store, "--storage-budget", str(1 << 34), *extra,
                   "--log-level", "warning", "--deposit-rate", "1000000", "--deposit-burst",
                   "1000000", "--frame-rate", "1000000", "--frame-burst", "1000000",
                   "--max-connections", "20000", "--subscriptions-per-connection", "10",
                   # Thousands of mailboxes are made for the workload: their price (issue 15)
                   # is not what is measured here.
                   "--pow-create-bits", "8"])


# --- workloads ----------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def stamped() -> bytes:
    return struct.pack(">d", time.perf_counter()) + os.urandom(BLOCK - 8)


async def relay_workload(url: str | list[str], pairs: int, messages: int, inflight: int,
                         crossed: list[float] | None = None) -> tuple[float, list[float]]:
    """`url`: one relay, or several nodes of one: pair i's receiver is on node i mod n and its
    sender on node (i // n) mod n, so with two nodes half the pairs cross nodes (their
    latencies are also added to `crossed`)."""
    urls = [url] if isinstance(url, str) else url
    conn = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=conn)
    latencies: list[float] = []
    total = pairs * messages
    token = os.urandom(32)
    setup = []
    for i in range(pairs):
        r = await RelayClient.connect(urls[i % len(urls)], session=session)
        s = await RelayClient.connect(urls[i // len(urls) % len(urls)], session=session)
        sig, box = SigningKey.generate(), PrivateKey.generate()
        created = await r.create(sig, bytes(box.public_key))
        await r.token_add(created.owner_id, sig, token)
        await r.subscribe(created.owner_id, sig)
        setup.append((r, s, created, box, i % len(urls) != i // len(urls) % len(urls)))

    async def receive(r: RelayClient, created: object, box: PrivateKey, relay_pub: bytes,
                      cross: bool) -> None:
        from nacl.public import Box, PublicKey
        opener = Box(box, PublicKey(relay_pub))
        acks: list[asyncio.Future[None]] = []
        got = 0
        while got < messages:
            batch = [await r.messages.get()]
            while not r.messages.empty():
                batch.append(r.messages.get_nowait())
            for m in batch:
                t = struct.unpack(">d", opener.decrypt(m.sealed)[:8])[0]
                latencies.append(time.perf_counter() - t)
                if cross and crossed is not None:
                    crossed.append(latencies[-1])
            got += len(batch)
            # Acknowledge in batches, without waiting: as a real client would.
            acks.append(asyncio.ensure_future(r.ack([m.msg_id for m in batch])))
        await asyncio.gather(*acks)

    async def send(s: RelayClient, deposit_id: bytes) -> None:
        sem = asyncio.Semaphore(inflight)

        async def one() -> None:
            async with sem:
                await s.deposit(deposit_id, stamped(), token=token)

        await asyncio.gather(*(one() for _ in range(messages)))

    t0 = time.perf_counter()
    tasks = [receive(r, c, box, c.relay_box_pub, x) for r, _, c, box, x in setup]
    tasks += [send(s, c.deposit_id) for _, s, c, _, _ in setup]
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    for r, s, _, _, _ in setup:
        await r.close()
        await s.close()
    await session.close()
    return total / elapsed, latencies


async def forwarder_workload(url: str, pairs: int, messages: int, inflight: int
                             ) -> tuple[float, list[float]]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    latencies: list[float] = []
    conns = []
    for _ in range(pairs):
        r = await session.ws_connect(url, max_msg_size=1 << 20)
        s = await session.ws_connect(url, max_msg_size=1 << 20)
        name = os.urandom(16)
        await r.send_bytes(b"\x00" + name)
        conns.append((r, s, name))
    await asyncio.sleep(0.2)  # let subscriptions land (no reply in the bare protocol)

    async def receive(r: aiohttp.ClientWebSocketResponse) -> None:
        for _ in range(messages):
            msg = await r.receive()
            latencies.append(time.perf_counter() - struct.unpack(">d", msg.data[:8])[0])

    async def send(s: aiohttp.ClientWebSocketResponse, name: bytes) -> None:
        pending: dict[int, asyncio.Future[None]] = {}

        async def reader() -> None:
            async for msg in s:
                fut = pending.pop(struct.unpack(">I", msg.data)[0], None)
                if fut is not None:
                    fut.set_result(None)

        rt = asyncio.ensure_future(reader())
        sem = asyncio.Semaphore(inflight)
        loop = asyncio.get_running_loop()

        async def one(i: int) -> None:
            async with sem:
                fut: asyncio.Future[None] = loop.create_future()
                pending[i] = fut
                await s.send_bytes(b"\x01" + struct.pack(">I", i) + name + stamped())
                await fut

        await asyncio.gather(*(one(i) for i in range(messages)))
        rt.cancel()

    t0 = time.perf_counter()
    await asyncio.gather(*[receive(r) for r, _, _ in conns], *[send(s, n) for _, s, n in conns])
    elapsed = time.perf_counter() - t0
    for r, s, _ in conns:
        await r.close()
        await s.close()
    await session.close()
    return pairs * messages / elapsed, latencies


async def idle_workload(url: str, n: int, session: aiohttp.ClientSession) -> int:
    clients = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            c = await RelayClient.connect(url, session=session)
            sig = SigningKey.generate()
            created = await c.create(sig, bytes(PrivateKey.generate().public_key))
            await c.subscribe(created.owner_id, sig)
            clients.append(c)

    await asyncio.gather(*(one() for _ in range(n)))
    return len(clients)


async def main_async(args: argparse.Namespace) -> None:
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"workload: {args.pairs} sender/receiver pairs x {args.messages} blocks of {BLOCK} "
          f"bytes, {args.inflight} in flight per sender, loopback, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds each")
    with tempfile.TemporaryDirectory() as tmp:
        relay = start_relay(os.path.join(tmp, "data"))
        fwd = Server([sys.executable, str(Path(__file__).resolve()), "--forwarder", "{fd}"])
        runs: dict[str, list[Server]] = {"forwarder": [fwd], "relay": [relay]}
        labels = {"forwarder": "bare aiohttp WebSocket forwarder (no storage)",
                  "relay": "aegis-relay (durability: SQLite WAL, synchronous=FULL, group commit)"}
        pg = None
        if args.store == "postgresql":
            # A PostgreSQL server of its own, set up as the relay's tests set theirs up
            # (contrib/relay/postgresql.conf); one database for one node, one for two.
            from tests.relay.postgres import PostgresServer
            # (Its helpers run their own event loops: in a thread.)
            pg = await asyncio.to_thread(PostgresServer)
            for batch in (args.pg_notify_batch_ms, 0.0):
                how = f"notifications batched {batch:g} ms" if batch else "a NOTIFY per deposit"
                one = await asyncio.to_thread(pg.new_database)
                two = await asyncio.to_thread(pg.new_database)
                runs[f"pg1/{batch:g}"] = [start_relay(os.path.join(tmp, f"pg1-{batch:g}"), one,
                                                      batch)]
                runs[f"pg2/{batch:g}"] = [
                    start_relay(os.path.join(tmp, f"pg2-{batch:g}-{i}"), two, batch)
                    for i in range(2)]
                labels[f"pg1/{batch:g}"] = f"aegis-relay on PostgreSQL, one node, {how}"
                labels[f"pg2/{batch:g}"] = (
                    f"aegis-relay on PostgreSQL, two nodes on one database, {how} (half the "
                    "pairs cross nodes: pushed through NOTIFY)")
        try:
            for srvs in runs.values():
                for srv in srvs:
                    await srv.wait_ready("/ws" if srv is fwd else "/health")
            rates: dict[str, list[float]] = {name: [] for name in runs}
            lats: dict[str, list[float]] = {name: [] for name in runs}
            cpus: dict[str, list[float]] = {name: [] for name in runs}
            crossed: dict[str, list[float]] = {name: [] for name in runs}
            # Rounds alternate between them, so a noisy neighbour hits all alike.
            for _ in range(args.rounds):
                for name, srvs in runs.items():
                    cpu0 = sum(srv.cpu_s() for srv in srvs)
                    if name != "forwarder":
                        rate, lat = await relay_workload(
                            [f"http://127.0.0.1:{srv.port}/v1/ws" for srv in srvs], args.pairs,
                            args.messages, args.inflight, crossed[name])
                    else:
                        rate, lat = await forwarder_workload(
                            f"http://127.0.0.1:{fwd.port}/ws", args.pairs, args.messages,
                            args.inflight)
                    rates[name].append(rate)
                    lats[name] += lat
                    cpus[name].append((sum(srv.cpu_s() for srv in srvs) - cpu0)
                                      / (args.pairs * args.messages))
            for name in runs:
                label = labels[name]
                rs = ", ".join(f"{r:,.0f}" for r in rates[name])
                print(f"{label}: {statistics.median(rates[name]):,.0f} deposits/s "
                      f"(median of {rs}), deposit-to-delivery p50 "
                      f"{pct(lats[name], 50) * 1000:.1f} ms, "
                      f"p99 {pct(lats[name], 99) * 1000:.1f} ms,"
                      f" server CPU {statistics.median(cpus[name]) * 1e6:.0f} us per deposit")
                if crossed[name]:
                    print(f"  of which across nodes: p50 {pct(crossed[name], 50) * 1000:.1f} ms,"
                          f" p99 {pct(crossed[name], 99) * 1000:.1f} ms")
            ratio = statistics.median(rates["relay"]) / statistics.median(rates["forwarder"])
            print(f"relay / forwarder throughput (medians): {ratio:.0%}")
            if pg is not None:
                print("(server CPU of the PostgreSQL rows: the relay nodes' only, not the "
                      "database's processes)")
                print(await asyncio.to_thread(key_table_rewrite, pg))
        finally:
            for srvs in runs.values():
                for srv in srvs:
                    srv.stop()
            if pg is not None:
                pg.close()
        if args.idle:
            relay = start_relay(os.path.join(tmp, "idle"))
            try:
                await relay.wait_ready("/health")
                rss0, _ = relay.rss_mb()
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0)) as session:
                    held = await idle_workload(f"http://127.0.0.1:{relay.port}/v1/ws", args.idle,
                                               session)
                    await asyncio.sleep(1)
                    rss, hwm = relay.rss_mb()
                print(f"idle: {held} subscribed connections held; relay RSS {rss:.0f} MB "
                      f"(peak {hwm:.0f} MB, {rss0:.0f} MB before connecting)")
            finally:
                relay.stop()


def key_table_rewrite(pg: object) -> str:
    """The maintenance's VACUUM FULL of the key table at 100,000 live rows (and 1,000 deleted),
    in a database of its own."""
    from relay.storage_pg import PostgresStorage
    from tests.relay.postgres import PostgresServer
    assert isinstance(pg, PostgresServer)
    dsn = pg.new_database()

    async def measure() -> str:
        import asyncpg
        s = PostgresStorage(dsn)
        await s.open()
        await s.close()
        con = await asyncpg.connect(dsn)
        try:
            await con.execute("INSERT INTO message_keys SELECT g, sha256(g::text::bytea)"
                              " FROM generate_series(1, 101000) g")
            await con.execute("DELETE FROM message_keys WHERE id > 100000")
            size = await con.fetchval("SELECT pg_total_relation_size('message_keys')")
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                await con.execute("VACUUM FULL message_keys")
                times.append(time.perf_counter() - t0)
        finally:
            await con.close()
        return (f"key table rewrite (VACUUM FULL message_keys, 100,000 rows, {size / 2**20:.1f}"
                f" MiB): median {statistics.median(times) * 1000:.0f} ms of 3")

    return asyncio.run(measure())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--forwarder":
        forwarder_main(int(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians printed")
    p.add_argument("--idle", type=int, default=5000, help="idle subscribed connections (0: skip)")
    p.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite",
                   help="postgresql: also the relay on PostgreSQL (a server of its own, "
                        "Debian's postgresql package), one node and two, in the same run")
    p.add_argument("--pg-notify-batch-ms", type=float, default=5.0,
                   help="the relay's --pg-notify-batch-ms for the batched PostgreSQL rows "
                        "(the same run also measures 0: a NOTIFY per deposit)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
