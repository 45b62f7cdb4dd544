"""A lone client's deposit latency while another process floods the storage writer (issue 15,
item 8).

The flooder (a separate process, so the measuring client's own loop stays idle) opens
`--connections` connections and keeps 64 deposits in flight on each; the lone client deposits
one block every 10 ms and times each. Prints the median and p99 beside the unattacked baseline
of the same run, and the flood's own rate.

    python bench/relay_writer.py [--connections 40] [--seconds 8] [-- RELAY OPTIONS...]

Bounded: about 20 s; the relay's data (a few hundred MiB) is in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.relay import Server  # noqa: E402
from relay import wire  # noqa: E402
from relay.client import Created, RelayClient, RelayError  # noqa: E402


async def mailbox(c: RelayClient, token: bytes) -> Created:
    sig = SigningKey.generate()
    created = await c.create(sig, bytes(PrivateKey.generate().public_key))
    await c.token_add(created.owner_id, sig, token)
    return created


async def flooder(url: str, n: int) -> None:
    token = os.urandom(32)
    conns = [await RelayClient.connect(url) for _ in range(n)]
    boxes = [await mailbox(c, token) for c in conns]
    done = [0]

    async def one(c: RelayClient, box: Created) -> None:
        while True:
            try:
                await c.deposit(box.deposit_id, os.urandom(wire.BLOCK_SIZE), token=token)
                done[0] += 1
            except RelayError:
                await asyncio.sleep(0.001)

    async def report() -> None:
        await asyncio.sleep(2)
        start, t0 = done[0], time.monotonic()
        await asyncio.sleep(6)
        print(f"  the flood: {(done[0] - start) / (time.monotonic() - t0):.0f} deposits/s",
              flush=True)

    await asyncio.gather(report(), *(one(c, b) for c, b in zip(conns, boxes, strict=True)
                                     for _ in range(64)))


async def measure(c: RelayClient, box: Created, token: bytes, seconds: float) -> str:
    lat: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            await c.deposit(box.deposit_id, os.urandom(wire.BLOCK_SIZE), token=token)
            lat.append((time.perf_counter() - t) * 1000)
        except RelayError:
            errors += 1
        await asyncio.sleep(0.01)
    lat.sort()
    ok = len(lat) / max(1, len(lat) + errors) * 100
    return (f"median {statistics.median(lat):.1f} ms, p99 {lat[int(0.99 * len(lat))]:.1f} ms, "
            f"{len(lat)} deposits, {ok:.1f}% succeeded")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server([sys.executable, "-m", "relay.main", "--listen-fd", "{fd}", "--data",
                         tmp, "--log-level", "warning", "--deposit-rate", "1000000",
                         "--deposit-burst", "1000000", "--frame-rate", "1000000",
                         "--frame-burst", "1000000", "--queue-limit", "1000000", *args.relay])
        url = f"http://127.0.0.1:{server.port}/v1/ws"
        flood = None
        try:
            await server.wait_ready("/health")
            token = os.urandom(32)
            lone = await RelayClient.connect(url)
            box = await mailbox(lone, token)
            print("a lone client's deposits:")
            print("  unattacked:", await measure(lone, box, token, 4))
            flood = subprocess.Popen([sys.executable, __file__, "--flood", url,
                                      str(args.connections)])
            await asyncio.sleep(2)
            print(f"  while {args.connections} connections flood the writer:",
                  await measure(lone, box, token, args.seconds), flush=True)
            await asyncio.sleep(1)
            await lone.close()
        finally:
            if flood is not None:
                flood.kill()
                flood.wait()
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--flood":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(flooder(sys.argv[2], int(sys.argv[3])))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=40)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("relay", nargs="*", help="further relay options (after --)")
    asyncio.run(main(p.parse_args()))
