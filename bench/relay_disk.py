"""What the relay's database file alone says about the order of events (docs/relay-protocol.md §8).

    .venv/bin/python bench/relay_disk.py [--mailboxes 400] [--deposits 4000] [--seed 1]

Runs the same workload through the relay's storage (schema 2: random row keys, one order per
mailbox) and, as the baseline in the same run, through schema 1 as it was (sequential row
numbers, `AUTOINCREMENT` block ids): mailboxes created one after the other, then deposits into
random mailboxes with acknowledgements of each mailbox's oldest block in between (a steady
state, about half the deposits still queued at the end). Then it reads the file as someone
holding the disk would (bench/linkbench/pages.py) and prints, for mailboxes and for the blocks
still queued:

  * key rho: Spearman's correlation of row keys with creation order (1.00: a sequence);
  * same page: the share of rows made one after the other that share a leaf page;
  * in-page: among all pairs of rows sharing a leaf page, the share whose places in the page
    (the order their cells were written) agree with creation order (0.50: no information);
  * blocks only, overflow rho and near: the correlation of each block's first overflow page
    (allocated when it was written) with deposit order, and the share of blocks deposited one
    after the other whose overflow pages are within 8 pages of each other.

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.linkbench.pages import Place, row_places  # noqa: E402
from relay import storage as st  # noqa: E402
from relay import wire  # noqa: E402


def ranks(xs: list[int]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    for r, i in enumerate(order):
        out[i] = float(r)
    return out


def spearman(xs: list[int]) -> float:
    """Correlation of values with their position (creation order)."""
    n = len(xs)
    if n < 3:
        return float("nan")
    r = ranks(xs)
    d = sum((ri - i) ** 2 for i, ri in enumerate(r))
    return 1 - 6 * d / (n * (n * n - 1))


def page_figures(order: list[int], places: dict[int, Place]) -> tuple[float, float]:
    """(same page, in-page agreement) for rows given by key in creation order."""
    got = [places[k] for k in order if k in places]
    same = sum(a.page == b.page for a, b in itertools.pairwise(got))
    by_page: dict[int, list[tuple[int, int]]] = {}
    for i, p in enumerate(got):
        by_page.setdefault(p.page, []).append((i, p.rank))
    agree = pairs = 0
    for cells in by_page.values():
        for (i, ri), (j, rj) in itertools.combinations(cells, 2):
            pairs += 1
            agree += (ri < rj) == (i < j)
    return same / max(1, len(got) - 1), agree / pairs if pairs else float("nan")


async def workload_2(path: Path, mailboxes: int, deposits: int,
                     rng: random.Random) -> tuple[list[int], list[int]]:  # fmt: skip
    """Schema 2 through the relay's own storage: mailbox keys and queued block row keys, each
    in creation order."""
    s = st.SQLiteStorage(str(path))
    await s.open()
    try:
        boxes = [await s.create_mailbox(rng.randbytes(32), rng.randbytes(32), b"s" * 32,
                                        b"b" * 32, b"o" * 32, False)
                 for _ in range(mailboxes)]
        tags: list[bytes] = []
        for i in range(deposits):
            tag = i.to_bytes(8, "big")
            await s.enqueue(rng.choice(boxes), 2**40, tag + rng.randbytes(wire.BLOCK_SIZE - 8))
            tags.append(tag)
            if rng.random() < 0.5:
                box = rng.choice(boxes)
                oldest = await s.queued(box, (), 1)
                if oldest:
                    await s.remove(box, [oldest[0][0]])
    finally:
        await s.close()
    db = sqlite3.connect(path / "relay.sqlite3")
    keys = dict(db.execute("SELECT substr(block, 1, 8), id FROM messages").fetchall())
    db.close()
    return boxes, [keys[t] for t in tags if t in keys]


def workload_1(path: Path, mailboxes: int, deposits: int,
               rng: random.Random) -> tuple[list[int], list[int]]:  # fmt: skip
    """The baseline: schema 1 and the statements the relay ran on it."""
    db = sqlite3.connect(path / "relay.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA secure_delete=ON")
    db.executescript(st.SCHEMA_1)
    boxes = []
    for _ in range(mailboxes):
        cur = db.execute("INSERT INTO mailboxes (owner_key, deposit_key, sig_pub, box_secret,"
                         " owner_box_pub, public, tokens) VALUES (?, ?, ?, ?, ?, 0, x'')",
                         (rng.randbytes(32), rng.randbytes(32), b"s" * 32, b"b" * 32, b"o" * 32))
        boxes.append(int(cur.lastrowid or 0))
    ids = []
    for _ in range(deposits):
        cur = db.execute("INSERT INTO messages (mailbox, expiry, block) VALUES (?, ?, ?)",
                         (rng.choice(boxes), 2**40, rng.randbytes(wire.BLOCK_SIZE)))
        ids.append(int(cur.lastrowid or 0))
        if rng.random() < 0.5:
            box = rng.choice(boxes)
            row = db.execute("SELECT id FROM messages WHERE mailbox = ? ORDER BY id LIMIT 1",
                             (box,)).fetchone()
            if row:
                db.execute("DELETE FROM messages WHERE id = ?", row)
    left = {r[0] for r in db.execute("SELECT id FROM messages")}
    db.close()
    return boxes, [i for i in ids if i in left]


def report(name: str, path: Path, boxes: list[int], blocks: list[int]) -> None:
    db = sqlite3.connect(path / "relay.sqlite3")
    mb_places = row_places(db, "mailboxes")
    msg_places = row_places(db, "messages")
    db.close()
    same, inpage = page_figures(boxes, mb_places)
    print(f"{name:<28} mailboxes ({len(boxes)}): key rho {spearman(boxes):+.2f}, "
          f"same page {same:.2f}, in-page {inpage:.2f}")
    same, inpage = page_figures(blocks, msg_places)
    over = [msg_places[k].overflow for k in blocks if k in msg_places]
    near = sum(abs(a - b) <= 8 for a, b in itertools.pairwise(over)) / max(1, len(over) - 1)
    print(f"{'':<28} queued blocks ({len(blocks)}): key rho {spearman(blocks):+.2f}, "
          f"same page {same:.2f}, in-page {inpage:.2f}, overflow rho {spearman(over):+.2f}, "
          f"near {near:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mailboxes", type=int, default=400)
    ap.add_argument("--deposits", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old, new = Path(tmp) / "schema1", Path(tmp) / "schema2"
        old.mkdir()
        boxes, blocks = workload_1(old, a.mailboxes, a.deposits, random.Random(a.seed))
        report("schema 1 (baseline)", old, boxes, blocks)
        boxes, blocks = asyncio.run(workload_2(new, a.mailboxes, a.deposits,
                                               random.Random(a.seed)))  # fmt: skip
        report("schema 2 (random keys)", new, boxes, blocks)


if __name__ == "__main__":
    main()
