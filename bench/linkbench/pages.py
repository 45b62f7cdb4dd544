"""Where each row of a SQLite table sits in the file: its leaf page, and its place within that
page in the order the page's cells were written.

SQLite writes a new cell below those already in the page (the cell content area grows down
from the end of the page) or into a freed gap, and rewrites a page's cells in key order only
when it rebalances the page. So, among the rows that share a leaf page, the one written later
usually sits lower: an adversary holding the file gets a partial order of creation even when
row keys are random. The attack uses it (`route_db_order`); docs/relay-protocol.md §8 states it.

A hand-written reader of the documented file format (https://sqlite.org/fileformat2.html):
no library exposes cell offsets. It reads a copy made with SQLite's backup API, which copies
pages verbatim (the WAL's included).
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

LEAF_TABLE = 0x0D
INTERIOR_TABLE = 0x05


@dataclass(frozen=True)
class Place:
    page: int
    #: 0 for the cell written first among the page's cells (the highest offset), and so on.
    rank: int
    #: The first overflow page of a row too large for its leaf page (a queued block), else 0:
    #: allocated when the row was written, from the free list or at the end of the file.
    overflow: int = 0


def _local_size(payload: int, usable: int) -> int:
    """How much of a payload a table leaf cell holds itself (the file format's formula)."""
    most = usable - 35
    if payload <= most:
        return payload
    least = (usable - 12) * 32 // 255 - 23
    k = least + (payload - least) % (usable - 4)
    return k if k <= most else least


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        b = buf[at + i]
        if i == 8:
            return (value << 8) | b, at + 9
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, at + i + 1
    raise AssertionError("unreachable")


def _places(data: bytes, page_size: int, root: int) -> dict[int, Place]:
    out: dict[int, Place] = {}
    todo = [root]
    seen: set[int] = set()
    while todo:
        pno = todo.pop()
        if pno in seen or pno < 1 or pno * page_size > len(data):
            continue
        seen.add(pno)
        page = data[(pno - 1) * page_size : pno * page_size]
        hdr = 100 if pno == 1 else 0
        kind = page[hdr]
        ncells = int.from_bytes(page[hdr + 3 : hdr + 5], "big")
        if kind == INTERIOR_TABLE:
            todo.append(int.from_bytes(page[hdr + 8 : hdr + 12], "big"))
            ptrs = hdr + 12
            for i in range(ncells):
                off = int.from_bytes(page[ptrs + 2 * i : ptrs + 2 * i + 2], "big")
                todo.append(int.from_bytes(page[off : off + 4], "big"))
        elif kind == LEAF_TABLE:
            ptrs = hdr + 8
            cells = []
            for i in range(ncells):
                off = int.from_bytes(page[ptrs + 2 * i : ptrs + 2 * i + 2], "big")
                size, at = _varint(page, off)
                rowid, at = _varint(page, at)
                local = _local_size(size, page_size)
                first = (int.from_bytes(page[at + local : at + local + 4], "big")
                         if local < size else 0)  # fmt: skip
                cells.append((off, rowid, first))
            for rank, (_, rowid, first) in enumerate(sorted(cells, reverse=True)):
                out[rowid] = Place(pno, rank, first)
    return out


def row_places(db: sqlite3.Connection, table: str) -> dict[int, Place]:
    """rowid -> its place, for every row of `table` (a table with rowids)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy.sqlite3"
        dst = sqlite3.connect(copy)
        try:
            db.backup(dst)
            root = dst.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table'"
                               " AND name = ?", (table,)).fetchone()  # fmt: skip
            page_size = int(dst.execute("PRAGMA page_size").fetchone()[0])
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
        if root is None:
            return {}
        return _places(copy.read_bytes(), page_size, int(root[0]))
