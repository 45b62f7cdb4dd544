"""Attachment benchmark: end-to-end file throughput beside the relay's raw block throughput.

    .venv/bin/python bench/attachments.py [--size-mb 20] [--runs 3]

Starts its own relay (cheap proofs of work) and two daemons (alice, bob) on loopback under a
temporary directory, connects them, then, for each run:

  * end to end: from calling `attachments.send` on alice's socket (which encrypts the file into
    alice's profile) to bob's `attachment.completed` event (upload, descriptor through the
    ratchet, download, per-block checks, digest check, stored encrypted in bob's profile);
  * the ceiling, measured in the same run against the same relay: a bare RelayClient puts the
    same number of (padded) blocks with BLOB_PUT and gets them back with BLOB_GET, with the
    same number of requests in flight as the daemon uses (no encryption, no disk, no store).

Both figures are MB/s of the file's size (1 MB = 10^6 bytes); the ratio is end-to-end over the
ceiling. Medians of --runs runs. A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nacl.public import PrivateKey  # noqa: E402

from aegis_cli.client import Client  # noqa: E402
from aegisd.core import wire  # noqa: E402
from aegisd.demo import Stage, aegis  # noqa: E402
from aegisd.services.attachments import WINDOW  # noqa: E402
from bench.daemon import connect  # noqa: E402
from relay.client import RelayClient  # noqa: E402


def end_to_end(stage: Stage, path: Path) -> float:
    """Seconds from attachments.send to bob's attachment.completed."""
    with (
        Client(stage.home("alice") / "aegisd.sock", timeout=300) as alice,
        Client(stage.home("bob") / "aegisd.sock", timeout=300) as bob,
    ):
        bob.call("events.subscribe", {"types": ["attachment.completed", "attachment.failed"]})
        notes = bob.notifications()
        t0 = time.perf_counter()
        aid = alice.call("attachments.send", {"contact": "bob", "path": str(path)})[
            "attachment_id"
        ]
        while True:
            ev = next(notes)["params"]
            if ev["data"]["attachment_id"] == aid:
                if ev["type"] != "attachment.completed":
                    raise RuntimeError(f"the transfer failed: {ev['data'].get('reason')}")
                return time.perf_counter() - t0


async def raw_blocks(url: str, blocks: int) -> float:
    """Seconds for BLOB_QUOTA + `blocks` BLOB_PUTs + as many BLOB_GETs, WINDOW in flight."""
    block = bytes([wire.VERSION]) + os.urandom(wire.BLOCK_SIZE - 1)
    cap = os.urandom(32)
    ids = [os.urandom(16) for _ in range(blocks)]
    key = PrivateKey.generate()
    t0 = time.perf_counter()
    up = await RelayClient.connect(url)
    try:
        await up.blob_quota(blocks)
        for i in range(0, blocks, WINDOW):
            await asyncio.gather(*(up.blob_put(b, cap, block) for b in ids[i : i + WINDOW]))
    finally:
        await up.close()
    down = await RelayClient.connect(url)
    try:
        for i in range(0, blocks, WINDOW):
            await asyncio.gather(*(down.blob_get(b, cap, key) for b in ids[i : i + WINDOW]))
        elapsed = time.perf_counter() - t0
        for i in range(0, blocks, WINDOW):  # clean up (not timed)
            await asyncio.gather(*(down.blob_del(b, cap) for b in ids[i : i + WINDOW]))
    finally:
        await down.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=20.0, help="file size in MiB")
    ap.add_argument("--runs", type=int, default=3, help="runs of each measurement")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="aegis-bench-", dir="/tmp"))
    stage = Stage(base)
    try:
        stage.start_relay()
        for name in ("alice", "bob"):
            aegis(stage.home(name), "init", "--no-passphrase", "--relay", stage.relay_url)
            stage.start_daemon(name)
            aegis(stage.home(name), "name", name)
        connect(stage)
        size = int(args.size_mb * 1024 * 1024)
        src = base / "bench.bin"
        src.write_bytes(os.urandom(size))
        blocks = wire.attachment_blocks(size)
        mb = size / 1e6
        print(f"file {size} bytes = {blocks} blocks of {wire.BLOCK_SIZE} (padded); "
              f"{args.runs} runs; {WINDOW} requests in flight")  # fmt: skip
        e2e, raw = [], []
        for _ in range(args.runs):
            raw.append(mb / asyncio.run(raw_blocks(stage.relay_url, blocks)))
            e2e.append(mb / end_to_end(stage, src))
        ceiling, ours = statistics.median(raw), statistics.median(e2e)
        print(f"relay raw BLOB_PUT+BLOB_GET (ceiling)  median {ceiling:7.1f} MB/s  "
              f"runs {', '.join(f'{x:.1f}' for x in raw)}")  # fmt: skip
        print(f"attachment end to end (send->completed) median {ours:6.1f} MB/s  "
              f"runs {', '.join(f'{x:.1f}' for x in e2e)}")  # fmt: skip
        print(f"ratio end-to-end / ceiling = {ours / ceiling:.2f}")
    finally:
        stage.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
