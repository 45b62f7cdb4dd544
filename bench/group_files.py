"""Files to a group: one upload fetched by every member vs a copy per member (§25.10).

    .venv/bin/python bench/group_files.py [--sizes-mib 1,10] [--members 3,8,32]

Runs a relay in this process on loopback (cheap proofs of work; a recorder wrapped around its
blob handlers logs what its operator could: each BLOB_* request's connection, blob id and
time) and plays the sender and the members with bare RelayClients and the real file format
(aegisd/core/attachment.py: every block sealed with AES-256-GCM, as the daemon's spool). For
each file size and group size N, measured in the same run:

  * 1:1 baseline: one file to one contact: encrypt, one connection, BLOB_QUOTA, every block
    BLOB_PUT (32 in flight, as the daemon);
  * copies (the design): N - 1 copies, each under its own seed, encrypted two at a time (as
    group.send_file spools them), then uploaded at once on N - 1 connections (the daemon
    starts every copy's upload together); each member then fetches its own copy on its own
    connection and deletes it;
  * one upload (the alternative): the baseline's upload, then N - 1 members each fetch every
    block of the same blobs on their own connections (nobody deletes: no member knows it is
    the last).

Printed per row: bytes uploaded and wall time to "every block at the relay", the proof of
work a relay with default settings (pow_blob_bits 20) would ask for those quotas (hashes,
and seconds at this machine's measured SHA-256 rate, one core), and the relay's view: fetches
per blob (most), distinct connections that fetched one blob, connections that uploaded, and
the spread of the upload starts. A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from nacl.public import PrivateKey  # noqa: E402

from aegisd.core import wire  # noqa: E402
from aegisd.core.attachment import CHUNK_LEN, FileKeys  # noqa: E402
from aegisd.services.attachments import WINDOW  # noqa: E402
from relay import handlers  # noqa: E402
from relay import wire as rwire  # noqa: E402
from relay.app import RELAY_KEY, create_app  # noqa: E402
from relay.client import RelayClient  # noqa: E402
from relay.config import Config  # noqa: E402

MIB = 1024 * 1024
DEFAULT_POW_BLOB_BITS = Config().pow_blob_bits
BLOB_FRAMES = {rwire.BLOB_QUOTA: "quota", rwire.BLOB_PUT: "put", rwire.BLOB_GET: "get",
               rwire.BLOB_DEL: "del"}  # fmt: skip


@dataclass
class Recorder:
    """What the relay's operator can log of the blob area: per request, the connection, the
    blob id and the time (source addresses: all 127.0.0.1 here; without Tor, the members')."""

    rows: list[tuple[str, int, bytes, float]] = field(default_factory=list)

    def wrap(self) -> None:
        for kind, name in BLOB_FRAMES.items():
            inner = handlers._HANDLERS[kind]
            handlers._HANDLERS[kind] = self._recording(name, inner)

    def _recording(self, name: str, inner: Callable[[Any, Any], Awaitable[None]]
                   ) -> Callable[[Any, Any], Awaitable[None]]:  # fmt: skip
        async def handler(c: Any, f: Any) -> None:
            self.rows.append((name, id(c), bytes(f.body[: rwire.ID_LEN]), time.monotonic()))
            await inner(c, f)

        return handler

    def view(self) -> dict[str, Any]:
        gets: dict[bytes, list[int]] = defaultdict(list)
        puts: dict[int, list[float]] = defaultdict(list)
        for name, conn, blob, t in self.rows:
            if name == "get":
                gets[blob].append(conn)
            elif name == "put":
                puts[conn].append(t)
        starts = sorted(min(ts) for ts in puts.values())
        return {
            "fetches_per_blob": max((len(v) for v in gets.values()), default=0),
            "fetchers_per_blob": max((len(set(v)) for v in gets.values()), default=0),
            "upload_connections": len(puts),
            "upload_start_spread_ms": (starts[-1] - starts[0]) * 1000 if starts else 0.0,
        }


def seal_all(seed: bytes, data: bytes) -> list[bytes]:
    keys = FileKeys(seed)
    total = wire.attachment_blocks(len(data))
    return [keys.seal(i, total, data[i * CHUNK_LEN:(i + 1) * CHUNK_LEN]) for i in range(total)]


async def upload(url: str, seed: bytes, blocks: list[bytes]) -> None:
    keys = FileKeys(seed)
    c = await RelayClient.connect(url)
    try:
        await c.blob_quota(len(blocks))
        for s in range(0, len(blocks), WINDOW):
            await asyncio.gather(*(c.blob_put(keys.blob_id(i), keys.capability(i), blocks[i])
                                   for i in range(s, min(s + WINDOW, len(blocks)))))  # fmt: skip
    finally:
        await c.close()


async def fetch(url: str, seed: bytes, n: int, delete: bool) -> None:
    keys, box = FileKeys(seed), PrivateKey.generate()
    c = await RelayClient.connect(url)
    try:
        for s in range(0, n, WINDOW):
            got = await asyncio.gather(*(c.blob_get(keys.blob_id(i), keys.capability(i), box)
                                         for i in range(s, min(s + WINDOW, n))))  # fmt: skip
            for i, block in zip(range(s, min(s + WINDOW, n)), got, strict=True):
                keys.open(i, n, block)
        if delete:
            for s in range(0, n, WINDOW):
                await asyncio.gather(*(c.blob_del(keys.blob_id(i), keys.capability(i))
                                       for i in range(s, min(s + WINDOW, n))))  # fmt: skip
    finally:
        await c.close()


async def cleanup(url: str, seeds: list[bytes], n: int) -> None:
    c = await RelayClient.connect(url)
    try:
        for seed in seeds:
            keys = FileKeys(seed)
            await asyncio.gather(*(c.blob_del(keys.blob_id(i), keys.capability(i))
                                   for i in range(n)), return_exceptions=True)  # fmt: skip
    finally:
        await c.close()


def sha_rate() -> float:
    """SHA-256 proof-of-work hashes per second on one core (the solver's inner loop)."""
    base = hashlib.sha256(b"x" * 80)
    n, t0 = 200_000, time.perf_counter()
    for i in range(n):
        h = base.copy()
        h.update(i.to_bytes(16, "big"))
        h.digest()
    return n / (time.perf_counter() - t0)


async def measure(url: str, rec: Recorder, data: bytes, members: int, rate: float) -> None:
    blocks_n = wire.attachment_blocks(len(data))
    pow_hashes = 2 ** rwire.blob_pow_bits(DEFAULT_POW_BLOB_BITS, blocks_n)
    others = members - 1

    # 1:1 baseline: one copy, one upload.
    rec.rows.clear()
    t0 = time.perf_counter()
    seed = os.urandom(32)
    sealed = await asyncio.to_thread(seal_all, seed, data)
    await upload(url, seed, sealed)
    base_t = time.perf_counter() - t0
    await cleanup(url, [seed], blocks_n)
    base_seed = seed

    # copies: N - 1 seeds, encrypted two at a time, uploaded together; fetched once each.
    rec.rows.clear()
    gate = asyncio.Semaphore(2)
    seeds = [os.urandom(32) for _ in range(others)]

    async def spool(s: bytes) -> list[bytes]:
        async with gate:
            return await asyncio.to_thread(seal_all, s, data)

    t0 = time.perf_counter()
    copies = await asyncio.gather(*(spool(s) for s in seeds))
    await asyncio.gather(*(upload(url, s, b) for s, b in zip(seeds, copies, strict=True)))
    copies_t = time.perf_counter() - t0
    del copies
    await asyncio.gather(*(fetch(url, s, blocks_n, delete=True) for s in seeds))
    copies_view = rec.view()

    # one upload: the baseline's, then every member fetches the same blobs.
    rec.rows.clear()
    await upload(url, base_seed, sealed)  # the baseline's seed: its blobs were deleted
    await asyncio.gather(*(fetch(url, base_seed, blocks_n, delete=False)
                           for _ in range(others)))  # fmt: skip
    one_view = rec.view()
    await cleanup(url, [base_seed], blocks_n)

    up = blocks_n * wire.BLOCK_SIZE
    print(f"{len(data) // MIB:>4} MiB  N={members:<3}"
          f" 1:1 {up / MIB:7.1f} MiB {base_t:6.2f} s (pow {pow_hashes / rate:4.1f} s) |"
          f" copies {others * up / MIB:7.1f} MiB {copies_t:6.2f} s"
          f" ({copies_t / base_t:4.1f}x time, pow {others * pow_hashes / rate:6.1f} s) |"
          f" relay sees: copies {copies_view['fetches_per_blob']} fetch/blob,"
          f" {copies_view['upload_connections']} upload conns within"
          f" {copies_view['upload_start_spread_ms']:.0f} ms;"
          f" one upload {one_view['fetches_per_blob']} fetches/blob from"
          f" {one_view['fetchers_per_blob']} conns")  # fmt: skip


async def run(sizes: list[float], groups: list[int], base: Path) -> None:
    cfg = Config(data_dir=str(base / "relay"), pow_deposit_bits=8, pow_bundle_bits=8,
                 pow_blob_bits=8, pow_create_bits=8)  # fmt: skip
    rec = Recorder()
    rec.wrap()
    app = create_app(cfg)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    factory = app[RELAY_KEY].gate.install(runner.server)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"ws://127.0.0.1:{port}/v1/ws"
    try:
        rate = sha_rate()
        print(f"SHA-256 {rate / 1e6:.2f} M hashes/s (one core); pow at default "
              f"pow_blob_bits {DEFAULT_POW_BLOB_BITS}: 2^(bits + ceil(log2(units of 256 "
              f"blocks))) per quota; relay in this process; {WINDOW} requests in flight")
        for mib in sizes:
            data = os.urandom(int(mib * MIB))
            for n in groups:
                await measure(url, rec, data, n, rate)
    finally:
        server.close()
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1,10", help="file sizes in MiB, comma-separated")
    ap.add_argument("--members", default="3,8,32", help="group sizes N, comma-separated")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="aegis-bench-", dir="/tmp"))
    try:
        asyncio.run(run([float(x) for x in args.sizes_mib.split(",")],
                        [int(x) for x in args.members.split(",")], base))  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
