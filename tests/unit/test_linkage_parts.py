"""The parts of bench/linkage.py that need no processes: the WebSocket frame reader of the
capture, the figures, and the workload's promises (idle share, texts per active pair)."""

from __future__ import annotations

import os
import random
import sqlite3
import struct
from pathlib import Path

import pytest

from bench.linkbench import metrics, pages
from bench.linkbench import workload as wl
from bench.linkbench.capture import Frame, WsDecoder
from relay import wire


def ws_frame(payload: bytes, masked: bool, opcode: int = 0x2, fin: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([b0, (0x80 if masked else 0) | n])
    elif n < 65536:
        head = bytes([b0, (0x80 if masked else 0) | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, (0x80 if masked else 0) | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


def _decode(stream: bytes, up: bool, chunk: int) -> list[Frame]:
    sink: list[Frame] = []
    dec = WsDecoder(3, up, sink)
    for i in range(0, len(stream), chunk):
        dec.feed(stream[i : i + chunk], float(i))
    return sink


def test_decoder_reads_relay_frames_both_ways_in_any_chunking() -> None:
    owner, deposit, msg_id = os.urandom(16), os.urandom(16), os.urandom(16)
    up = [
        wire.encode(wire.DEPOSIT, 7, deposit + bytes([wire.AUTH_TOKEN]) + os.urandom(32)
                    + os.urandom(wire.BLOCK_SIZE)),
        wire.encode(wire.SUBSCRIBE, 8, owner + os.urandom(64)),
        wire.encode(wire.ACK, 9, msg_id),
    ]  # fmt: skip
    down = [
        wire.encode(wire.CREATED, 5, owner + deposit + os.urandom(32)),
        wire.encode(wire.MSG, 0, owner + msg_id + os.urandom(wire.SEALED_BLOCK_LEN)),
    ]
    # Client frames are masked, the relay's are not; a ping in between is no relay frame.
    up_stream = b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n" + ws_frame(b"p", True, 0x9)
    up_stream += b"".join(ws_frame(f, True) for f in up)
    down_stream = b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + ws_frame(b"p", False, 0xA)
    down_stream += b"".join(ws_frame(f, False) for f in down)
    for chunk in (1, 7, 1000, 1 << 20):
        got = _decode(up_stream, True, chunk)
        assert [f.type for f in got] == [wire.DEPOSIT, wire.SUBSCRIBE, wire.ACK]
        assert [f.size for f in got] == [len(f) for f in up]
        assert (got[0].mailbox, got[0].rid, got[0].up) == (deposit, 7, True)
        assert got[1].mailbox == owner
        assert got[2].other == msg_id and got[2].conn == 3
        got = _decode(down_stream, False, chunk)
        assert [f.type for f in got] == [wire.CREATED, wire.MSG]
        assert (got[0].mailbox, got[0].other) == (owner, deposit)
        assert (got[1].mailbox, got[1].other, got[1].size) == (owner, msg_id, len(down[1]))


def test_precision_at_k_counts_ties_in_expectation() -> None:
    assert metrics.precision_at_k([3, 2, 1, 0], [True, True, False, False], 2) == 1.0
    assert metrics.precision_at_k([0, 0, 0, 0], [True, True, False, False], 2) == 0.5
    assert metrics.precision_at_k([5, 1, 1, 0], [True, False, True, False], 2) == 0.75


def test_auc_and_correlations() -> None:
    assert metrics.auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert metrics.auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert metrics.auc([0, 1], [True, False]) == 0.0
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) is None
    assert metrics.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)


def test_random_baseline_percentile() -> None:
    # 1 true pair among 3, k = 1: a random pick is right with probability 1/3 < 0.95.
    assert metrics.random_p95(3, 1, 1) == 1.0
    # 7 of 15 (6 users): the 95th percentile of random precision at 7.
    p95 = metrics.random_p95(15, 7, 7)
    assert 7 / 15 < p95 < 1.0


def test_workload_keeps_its_promises() -> None:
    p = wl.Params(users=6, pairs=7, min_messages=10, max_messages=40, duration=120.0)
    for seed in range(20):
        w = wl.make(p, seed)
        assert len(w.pairs) == 7 and len({frozenset(x) for x in w.pairs}) == 7
        assert 7 - len(w.active) >= 7 / 3  # at least a third idle
        for a, b in w.active:
            n = sum(1 for s in w.sends if {s.sender, s.recipient} == {a, b})
            assert 10 <= n <= 40
        assert all(0 <= s.t <= p.duration for s in w.sends)
        assert len(w.away) == 6
        assert wl.make(p, seed) == w  # seeded


def test_the_page_reader_finds_every_row_and_the_order_its_cells_were_written(
    tmp_path: Path,
) -> None:
    """Rows with random keys, in a table spanning several pages: every row is found, and
    within a page that was never rebalanced the cells' order is the order of writing."""
    db = sqlite3.connect(tmp_path / "t.sqlite3")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    keys = [random.randrange(1, 2**63) for _ in range(12)]
    for k in keys:  # 12 small rows: one leaf page (the root), written in this order
        db.execute("INSERT INTO t VALUES (?, ?)", (k, os.urandom(20)))
    db.commit()
    places = pages.row_places(db, "t")
    assert [places[k].rank for k in keys] == list(range(12))
    assert len({p.page for p in places.values()}) == 1
    more = [random.randrange(1, 2**63) for _ in range(2000)]
    for k in more:
        db.execute("INSERT INTO t VALUES (?, ?)", (k, os.urandom(100)))
    db.commit()
    places = pages.row_places(db, "t")
    assert set(places) == set(keys + more)
    assert len({p.page for p in places.values()}) > 20
    db.close()


def test_fanout_simulation_times_deposits_as_the_daemon_does() -> None:
    """bench/linkage.py --groups: cover off, a group's copies land together (spread 0) or each
    within [0, spread]; cover on, the deposits are the slots whatever is sent (the same with
    the group messages as without); and the attack finds a group by its bursts."""
    from bench.linkbench import fanout

    p = fanout.Params(users=10, contacts=12, groups=(2, 3, 5), duration=6 * 3600.0)
    pop = fanout.make(p, 3)
    assert pop.group_sends > 0
    sessions = set(pop.sessions)  # members who are not contacts get a session of their own
    assert all(fanout._session(a, b) in sessions for g in pop.groups for a in g for b in g
               if a != b)  # fmt: skip
    together = fanout.deposits(pop, p, cover=False, spread=0.0, seed=3)
    assert max(together.until_last) <= fanout.CONCURRENT
    spread = fanout.deposits(pop, p, cover=False, spread=30.0, seed=3)
    assert max(spread.per_member) <= 30.0 and max(spread.until_last) > fanout.CONCURRENT
    with_groups = fanout.deposits(pop, p, cover=True, spread=0.0, seed=3)
    without = fanout.deposits(pop, p, cover=True, spread=0.0, seed=3, with_groups=False)
    assert with_groups.deposits == without.deposits
    assert min(with_groups.per_member) > 0  # each copy waited for a slot
    burst = fanout.attack(pop, together, p)
    assert burst.best()[2] > 0.8
