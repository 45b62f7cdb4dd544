"""The relay's memory under clients that do not read (issue 15, item 5).

Each of `--clients` connections subscribes to `--mailboxes` mailboxes that hold a full window
(32 blocks) each, and then reads nothing. Before the fix every subscription pushed its window
into the connection's queue (16 x 512 KiB = 8 MiB per connection here); now what waits for one
client stays within `--conn-buffer` (2 MiB by default) and the relay closes it after
`--stall-timeout`. Prints the relay's RSS before, while they are held, and after they are gone.

    python bench/relay_memory.py [--clients 32] [--mailboxes 16] [--hold 8]

Bounded: about 30 s and 256 MiB of disk in a temporary directory with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from nacl.public import PrivateKey
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.relay import Server  # noqa: E402
from relay import wire  # noqa: E402
from relay.client import Created, RelayClient  # noqa: E402

WINDOW = 32


def small_receive_buffer(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    s = socket.socket(family, type_, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s


def sockets(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            n += os.readlink(fd).startswith("socket:")
    return n


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def fill(url: str, n: int) -> list[tuple[SigningKey, Created]]:
    feeder = await RelayClient.connect(url)
    token = os.urandom(32)
    owners = []
    for _ in range(n):
        sig = SigningKey.generate()
        created = await feeder.create(sig, bytes(PrivateKey.generate().public_key))
        await feeder.token_add(created.owner_id, sig, token)
        await asyncio.gather(*(feeder.deposit(created.deposit_id, os.urandom(wire.BLOCK_SIZE),
                                              token=token) for _ in range(WINDOW)))
        owners.append((sig, created))
    await feeder.close()
    return owners


async def non_reader(url: str, owners: list[tuple[SigningKey, Created]]) -> RelayClient:
    c = await RelayClient.connect(
        url, connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer))
    assert c._reader is not None
    c._reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await c._reader
    for sig, created in owners:
        rid = c.next_rid()
        s = sig.sign(wire.auth_message(c.challenge,
                                       wire.encode(wire.SUBSCRIBE, rid, created.owner_id)))
        await c.send_raw(wire.encode(wire.SUBSCRIBE, rid, created.owner_id + s.signature))
    return c


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server([sys.executable, "-m", "relay.main", "--listen-fd", "{fd}", "--data",
                         tmp, "--log-level", "warning", "--deposit-rate", "100000",
                         "--deposit-burst", "100000", "--conn-buffer", str(args.conn_buffer),
                         "--stall-timeout", str(args.stall_timeout)])
        url = f"http://127.0.0.1:{server.port}/v1/ws"
        try:
            await server.wait_ready("/health")
            owners = await fill(url, args.clients * args.mailboxes)
            base = rss_mib(server.proc.pid)
            clients = [await non_reader(url, owners[i * args.mailboxes:(i + 1) * args.mailboxes])
                       for i in range(args.clients)]
            peak = base
            for _ in range(int(args.hold * 4)):
                await asyncio.sleep(0.25)
                peak = max(peak, rss_mib(server.proc.pid))
            for c in clients:  # drop the sockets (a close handshake would wait behind data)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c._session.close(), 2)
            await asyncio.sleep(3)
            after = rss_mib(server.proc.pid)
            left = sockets(server.proc.pid)
            queued = args.mailboxes * WINDOW * wire.BLOCK_SIZE / 2**20
            print(f"{args.clients} clients that do not read, {args.mailboxes} subscriptions "
                  f"each ({queued:.0f} MiB queued per client), conn_buffer "
                  f"{args.conn_buffer / 2**20:.1f} MiB:")
            print(f"  relay RSS before {base:.0f} MiB, peak while held {peak:.0f} MiB "
                  f"(+{(peak - base) / args.clients:.1f} MiB per client), "
                  f"after they are gone {after:.0f} MiB ({left} sockets open)")
        finally:
            server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--mailboxes", type=int, default=16)
    p.add_argument("--hold", type=float, default=8.0, help="seconds the clients are held")
    p.add_argument("--conn-buffer", type=int, default=2 * 1024 * 1024)
    p.add_argument("--stall-timeout", type=float, default=60.0)
    asyncio.run(main(p.parse_args()))
