"""Issue 15's figures: one anonymous client against the relay, beside the unattacked baseline.

    sudo .venv/bin/python bench/attack.py [--quick] [--scenario 1,3,5,6,8,disk] [--json]

Per scenario: a fresh relay (subprocess, loopback, a temporary data directory, default settings
but for the caps named below), a legitimate client (2 owners, each subscribed to a mailbox and
acknowledging what it gets, and 4 senders depositing into them with a token, 20 deposits/s in
all on a fixed schedule; each sender opens a fresh connection every 2 s, as clients that come,
go and change networks do, and the deposit that opens it counts the connect), measured alone
(baseline) and then while one hostile client (another process, from 127.0.0.2, at nice 10 so
that the relay and the legitimate client get the CPU first, as if the attacker had a machine of
its own) does one of issue 15's items as fast as it can:

  1     store flood: one connection creating mailboxes, adding tokens and depositing, 60 in
        flight (at the relay's own price for a mailbox);
  3     connection flood: as many subscribed connections as it can open (max_connections
        lowered to 1000 so that the cap is reached in seconds), each on a mailbox bought
        before the window (a dropped connection's mailbox is subscribed again by a new one),
        plus 400 half-open HTTP connections (--half-open) that never finish their upgrade
        request, each reopened when closed; the relay reached directly, the hostile address
        capped at source_connections 100;
  3t    the same flood where every client is loopback, as behind an onion service or a
        reverse proxy: no per-source cap (the relay's default for loopback);
  5     slow readers: N connections (8; quick 4), each subscribed to 40 mailboxes with 33
        queued blocks, that never read: the relay's memory beside the documented 2 MiB per
        connection (verdict "mem": peak at most 1.25 x (before + N x 2 MiB));
  6     blob flood: BLOB_QUOTA and BLOB_PUT as fast as it can (blob area lowered to 256 MiB so
        that it can fill within the run); the legitimate client also puts a blob block every
        0.5 s on a quota paid before (verdict "blob": at least 99 % of those succeed). The
        hostile client pays its first quota before the window, each next one while uploading;
  8     writer hog: four sender connections with 60 deposits in flight each, at all times, into
        mailboxes whose owner acknowledges everything (so its queues never fill);
  disk  the data directory on a tmpfs of 64 MiB plus the relay's disk reserve (if it has one):
        an owner's mailboxes are filled until deposits fail, then that owner drains them; PASS
        when the legitimate deposits succeed again within 30 s (quick 10) of the drain's start
        and keep succeeding (the last 20 or more, 3 s after the drain, all succeed). Needs root
        to mount; skipped with a message otherwise.

Except in item 1, whose attack is buying mailboxes, CREATE's proof of work (pow_create_bits, on a
relay that has it) is lowered to 8 bits: as if the hostile client had bought its mailboxes ahead
of time, which a price per mailbox does not prevent, and so that the setup fits in the run.

Each row: the legitimate deposits' p50/p99 latency (until OK) alone and under attack, the p99
ratio, the success rate under attack, PASS when p99 is at most 3x the baseline's and at least
99 % succeed (issue 15), the relay's resident memory in MB (before the attack, peak while
attacked, 2 s after the hostile client left) and, below the table, what the hostile client got
(answers by kind) and the legitimate failures. Every answer to the hostile client, errors
included, is counted, never fatal: as the relay gains prices and caps the hostile client gets
more errors and the legitimate figures decide. A measurement, not a test: nothing is asserted
(tests/unit/test_attack_parts.py checks the pure helpers). The machine's other load shows in
p99: compare rows of one run, and run it again before believing one FAIL or PASS near the bar.

Before (main at 986f17a, full run, 2 cores shared with other work; p50/p99 in ms):

    scenario            base50  base99  att50  att99  x99   ok %   verdict          RSS MB
    ------------------  ------  ------  -----  -----  ----  -----  ---------------  ----------
    1 store flood       2.0     9.2     15.7   192.4  20.8  100.0  FAIL             44/46/46
    3 connection flood  2.7     10.8    6.9    94.9   8.8   53.2   FAIL             44/68/68
    5 slow readers      4.8     17.5    4.3    64.2   3.7   100.0  FAIL, mem FAIL   52/191/191
    6 blob flood        3.6     14.0    2.1    97.7   7.0   100.0  FAIL, blob FAIL  44/47/46
    8 writer hog        3.8     13.6    45.8   198.6  14.6  100.0  FAIL             44/59/56
    disk full disk      1.3     8.1     -      -      -     0.0    FAIL             44/52/49

    1: hostile got: ok 46,963, mailboxes 16
    3: legitimate failures: http503 187; hostile got: http503 14,297, held_max 998, mailboxes 998,
        subscribed 998, half_open_opened 400, half_open_held_max 400
    5: 8 non-reading connections: relay grew 139 MB, documented bound 8 x 2 MiB = 16 MB (8.7x);
        after they closed 191 MB (before 52); hostile got: queued 10,560, mailboxes 320,
        slow_connections 8
    6: legitimate blob puts ok 100.0 % alone, 42.5 % under attack (limit 23); hostile got: ok
        16,334, limit 813, quotas 15
    8: hostile got: ok 53,465, acked 52,861, mailboxes 32
    disk: 64 MiB tmpfs filled in 0.3 s (1,967 blocks; then internal 5,856); while full the
        legitimate deposits got 0.0 % ok (internal 60); the owner acknowledged 0 (ack failures:
        internal 52); deposits succeed again NOT within 30 s; the 'att' columns are the deposits
        during the drain

After (main with issue 15's fixes, full run, the same machine; scenario 3 caps the hostile
address at source_connections 100, 3t is the same flood with every client loopback):

    scenario                                   base50  base99  att50  att99  x99   ok %   verdict
    -----------------------------------------  ------  ------  -----  -----  ----  -----  -------
    1 store flood                              2.2     5.4     1.8    8.0    1.5   100.0  PASS
    3 connection flood                         1.9     4.8     2.0    7.2    1.5   100.0  PASS
    3t connection flood, behind Tor or a proxy 2.0     5.6     2.1    38.3   6.9   100.0  FAIL
    5 slow readers                             2.0     5.4     2.1    6.5    1.2   100.0  PASS(mem)
    6 blob flood                               2.1     6.0     1.9    14.0   2.3   100.0  PASS(blob)
    8 writer hog                               2.1     5.4     6.1    14.0   2.6   100.0  PASS
    disk full disk                             1.6     5.0     1.5    6.7    1.3   91.0   PASS

    3t alone over a dozen runs: 2.3x to 6.9x, about 4x typically; with --attack 60 1.8x (most
    of the default 20 s is the hostile client opening its ~950 subscribed connections). On
    Python's own event loop (--event-loop asyncio) 3 was 2.5x to 2.7x and 3t 15x to 31x.

3t after new connections take turns (relay/turnstile.py, setups_per_turn 2), a cheaper set-up
(a mailbox's box key at its first seal, no queue read for an empty mailbox's SUBSCRIBE) and young
garbage collections every 10,000 allocations (relay/main.py), 2026-12-04, 2 cores shared (other
work: load 1 to 4, which raised the baselines' p99 from about 5 ms to as much as 20 ms); each
variant run alternately with the others, `--scenario 3t --timeline`; x99 per run:

    variant                                         x99 per run                  verdicts
    ----------------------------------------------  ---------------------------  --------
    main (9a6ff13)                                  1.8 3.8 1.8 3.0 2.1 1.3 2.5  1 FAIL
                                                    1.6 2.2 (median 2.1)
    cheaper set-up only (setups_per_turn 0)         2.2 1.4 3.5                  1 FAIL
    + turnstile                                     2.2 1.2 1.9 2.0 3.9 2.1 4.1  2 FAIL
    + young GC every 10,000 (kept)                  1.7 1.0 1.5 1.5 1.2 0.8 2.2  0 FAIL
                                                    1.2 1.9 1.4 (median 1.45)
    + middle GC every 2 young ones (not kept)       2.5 3.0 2.0                  1 FAIL

    Per second (--timeline), the kept variant's first 3 s of the attack (the flood's ramp) had
    p99s of 4 to 50 ms, main's 5 to 160 ms. By kind of deposit, attacked against alone in the
    same run: on a connection already open, p99 7.0 to 28.0 ms against 6.1 to 13.0 (main: 15.8
    to 62.7 against 5.6 to 19.7); opening its connection, 12.6 to 38.9 ms against 4.4 to 20.1
    (main: 12.6 to 120.3 against 6.1 to 30.9): those (40 of a run's 400) wait at the turnstile
    behind the flood's newcomers. The relay's own stalls
    (a gc.callbacks probe and a 1 ms ticker in the relay, through a sitecustomize.py): main's
    one full collection during the ramp (20 to 56 ms) is gone; one middle collection of 35 to
    136 ms remains per run (here late in the window or after it). Middle collections every 2
    young ones (not kept) kept every collection under 17 ms, but measured no better. Scenarios
    3, 1, 5 and 8 after it, once each: 3 1.2x, 1 3.0x (PASS at the bar, baseline p99 11 ms on
    the loaded machine), 5 0.8x (mem PASS), 8 2.1x; all PASS.

On a quiet machine (load below 1, nothing else running), main after the merge, 2026-12-04:
`--scenario 3t --timeline` three times: 1.5x, 1.3x, 1.6x (att99 5.7 to 6.7 ms, 100 % ok; the
previous main on a quiet machine: 4.5x, 2.9x, 4.5x). The full run (231 s):

    scenario                                    base50  base99  att50  att99  x99  ok %   verdict
    ------------------------------------------  ------  ------  -----  -----  ---  -----  -------
    1 store flood                               1.7     4.7     1.4    16.6   3.5  100.0  FAIL
    3 connection flood                          1.6     4.6     1.5    4.9    1.1  100.0  PASS
    3t connection flood, behind Tor or a proxy  1.6     4.1     1.5    6.6    1.6  100.0  PASS
    5 slow readers                              1.5     4.1     1.5    4.5    1.1  100.0  PASS(mem)
    6 blob flood                                1.6     4.5     1.4    32.9   7.4  100.0  FAIL
    8 writer hog                                1.5     4.0     3.5    7.5    1.9  100.0  PASS
    disk full disk                              1.1     3.5     1.3    5.4    1.6  84.7   PASS

    Scenarios 1 and 6 sit at the bar, run by run, on this quiet machine, before the turnstile
    as after it: 1 gave 2.3x and 2.1x on the commit before it, 3.7x, 6.6x, 1.8x, 3.5x and
    2.2x after, 2.1x and 5.6x with setups_per_turn 0, 3.7x and 8.0x with the default young
    collection; 6 gave 0.5x and 0.9x before (baselines of 25 to 31 ms), 3.3x, 1.5x and 7.4x
    after. What stalls scenario 1 is the disk, not the loop: a probe timing the writer's group
    commits showed ten commits of 9 to 64 ms in one attack (one of them a batch of a single
    deposit), the WAL's fsync under the flood's churn of deposits and secure deletions, and
    one full collection of 14 ms. A deposit that shares such a commit waits for it; bounding
    that needs a bound on the write rate one connection can impose, not yet built.

    After the review's fixes (a mailbox with a write in flight stays cached; connections waiting
    at the turnstile are evicted after the half-open ones; dead tickets take no place of a
    turn), the same quiet machine: 3t 10.1x, 2.0x, 2.3x (one FAIL: the honest deposits opening
    a connection had a p99 of 41 to 58 ms in one or two late seconds of the window, as one run
    before the fixes also had, 41.9 ms), scenario 1 1.3x. 3t is not yet reliably under the bar.
    The day's final code (a pipelined deposit writes on the mailbox cached now; held mailboxes
    move to the cache's back), quiet: 3t 1.9x, 1.6x, 1.5x; 1 1.5x, 1.9x; 6 4.0x, 6.4x FAIL
    (blob puts 100 %).

WAL checkpoints on a thread of their own (relay/checkpointer.py, every 4 MiB committed), the next
day on a quiet machine, the change (new) and the commit before it (old) run alternately; x99:

    scenario        new                        old
    6 blob flood    0.2 1.9 2.1 2.4 0.8 2.2    2.5 2.7 1.3 4.9 3.1 (6.3 3.8 earlier that day)
    1 store flood   1.5 2.9 2.2                3.5 4.9 4.1
    8 writer hog    2.2
    3t              1.3 3.4 1.8 1.4

    A probe timing every commit (scenario 6, old) found nine commits of 20 to 45 ms in the 20 s,
    each the one that crossed SQLite's automatic checkpoint threshold (the WAL at 32 MiB);
    every other commit took under 5 ms.

    The full run after it, quiet machine (233 s), every scenario PASS:

    scenario                                    base50  base99  att50  att99  x99  ok %   verdict
    ------------------------------------------  ------  ------  -----  -----  ---  -----  -------
    1 store flood                               2.0     5.6     1.9    9.1    1.6  100.0  PASS
    3 connection flood                          1.8     4.7     1.9    5.3    1.1  100.0  PASS
    3t connection flood, behind Tor or a proxy  1.9     5.2     1.9    11.9   2.3  100.0  PASS
    5 slow readers                              1.9     5.0     1.8    5.6    1.1  100.0  PASS(mem)
    6 blob flood                                1.7     4.5     1.5    7.4    1.6  100.0  PASS(blob)
    8 writer hog                                1.6     4.7     3.9    10.5   2.2  100.0  PASS
    disk full disk                              1.3     4.2     1.5    5.9    1.4  83.5   PASS

    5: the relay grew 14 MB under 8 non-reading connections (bound 16 MB). disk: deposits
    succeed again 0.7 s after the drain began.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from nacl.public import PrivateKey
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.relay import Server  # noqa: E402
from relay import wire  # noqa: E402
from relay.client import HandshakeFailed, RelayClient, RelayClosed, RelayError  # noqa: E402
from relay.config import Config  # noqa: E402

BLOCK = wire.BLOCK_SIZE
SCENARIOS = ("1", "3", "3t", "5", "6", "8", "disk")
TITLES = {
    "1": "store flood",
    "3": "connection flood",
    "3t": "connection flood, behind Tor or a proxy",
    "5": "slow readers",
    "6": "blob flood",
    "8": "writer hog",
    "disk": "full disk",
}
HOSTILE_SOURCE = "127.0.0.2"  # the legitimate client connects from 127.0.0.1
MAX_RATIO = 3.0
MIN_SUCCESS = 0.99
DOCUMENTED_BUFFER = 2 * 1024 * 1024  # docs/relay-protocol.md §2: 2 MiB waiting per connection
# Error names of docs/relay-protocol.md §5 (codes a newer relay adds show as "error<code>").
ERROR_NAMES = {
    1: "bad_frame", 2: "bad_version", 3: "too_large", 4: "out_of_order", 5: "unknown_type",
    6: "denied", 7: "bad_pow", 8: "rate_limited", 9: "queue_full", 10: "limit",
    11: "unknown_message", 12: "bad_block", 13: "exists", 14: "timeout", 15: "busy",
    16: "internal", 17: "full",
}


# --- pure helpers (tests/unit/test_attack_parts.py) ------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p % of the values at or below
    it (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, math.ceil(p / 100 * len(s)))
    return s[min(k, len(s)) - 1]


def outcome(exc: BaseException) -> str:
    """The kind of a failed request, for the counts."""
    if isinstance(exc, RelayError):
        return ERROR_NAMES.get(exc.code, f"error{exc.code}")
    if isinstance(exc, HandshakeFailed):
        return f"http{exc.status}" if exc.status else "handshake"
    if isinstance(exc, TimeoutError):
        return "no_answer"
    if isinstance(exc, RelayClosed | ConnectionError | aiohttp.ClientError | OSError):
        return "closed"
    return type(exc).__name__


@dataclass
class Phase:
    """The legitimate deposits started in one measured window."""

    latencies: list[float] = field(default_factory=list)  # of the successful ones, seconds
    failures: dict[str, int] = field(default_factory=dict)
    events: list[tuple[float, bool]] = field(default_factory=list)  # (start, succeeded)
    timed: list[tuple[float, float]] = field(default_factory=list)  # (start, latency)
    #: latencies of the deposits that opened their sender's connection (handshake included)
    connecting: list[float] = field(default_factory=list)

    def record(self, start: float, latency: float | None, failure: str = "",
               connected: bool = False) -> None:
        self.events.append((start, latency is not None))
        if latency is not None:
            self.latencies.append(latency)
            self.timed.append((start, latency))
            if connected:
                self.connecting.append(latency)
        else:
            self.failures[failure] = self.failures.get(failure, 0) + 1

    @property
    def total(self) -> int:
        return len(self.events)

    @property
    def success(self) -> float | None:
        return len(self.latencies) / self.total if self.total else None


def verdict(base: Phase, attacked: Phase) -> tuple[float | None, str]:
    """(p99 ratio, PASS or FAIL): issue 15's bar, p99 at most 3x and 99 % success."""
    b99, a99 = percentile(base.latencies, 99), percentile(attacked.latencies, 99)
    if not b99 or a99 is None:
        return None, "FAIL"
    ratio = a99 / b99
    ok = ratio <= MAX_RATIO and (attacked.success or 0.0) >= MIN_SUCCESS
    return ratio, "PASS" if ok else "FAIL"


def timeline(phase: Phase, step: float = 1.0) -> list[tuple[int, int, float]]:
    """(second of the window, deposits started in it, their p99 latency in ms), per `step`."""
    if not phase.timed:
        return []
    t0 = min(t for t, _ in phase.timed)
    slots: dict[int, list[float]] = {}
    for t, lat in phase.timed:
        slots.setdefault(int((t - t0) / step), []).append(lat)
    return [(k, len(v), (percentile(v, 99) or 0.0) * 1000) for k, v in sorted(slots.items())]


def print_timeline(name: str, phase: Phase) -> None:
    cells = [f"{k}s:{ms:.0f}" for k, _, ms in timeline(phase)]
    print(f"  {name} p99 ms by second of the attack: " + " ".join(cells), flush=True)
    conn = sorted(phase.connecting)
    rest = sorted(phase.latencies)
    for x in conn:
        rest.remove(x)
    def ms(v: list[float], p: float) -> str:
        q = percentile(v, p)
        return "-" if q is None else f"{q * 1000:.1f}"
    print(f"  {name} deposits opening a connection: n={len(conn)} p50 {ms(conn, 50)} p99 "
          f"{ms(conn, 99)} max {ms(conn, 100)}; on an open one: n={len(rest)} p50 "
          f"{ms(rest, 50)} p99 {ms(rest, 99)} max {ms(rest, 100)}", flush=True)


def recovery_time(events: Sequence[tuple[float, bool]], since: float, run: int = 20
                  ) -> float | None:
    """Seconds from `since` to the start of the run of successful deposits that ends the
    events, if that run is at least `run` long (None: deposits do not succeed for good)."""
    last = sorted(e for e in events if e[0] >= since)
    streak, start = 0, since
    for t, ok in reversed(last):
        if not ok:
            break
        streak += 1
        start = t
    if streak < max(run, 1):
        return None
    return start - since


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}"


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The figures as a fixed-width table, then one line of notes per scenario. Columns:
    p50 and p99 in ms alone (base) and attacked (att), their p99 ratio (x99), the attacked
    success rate, the verdict, the relay's RSS before / peak / after."""
    head = ("scenario", "base50", "base99", "att50", "att99", "x99", "ok %", "verdict",
            "RSS MB")
    lines = []
    for r in rows:
        ratio = r.get("ratio_p99")
        lines.append((
            f"{r['scenario']} {TITLES.get(r['scenario'], '')}".strip(),
            _ms(r.get("base_p50")), _ms(r.get("base_p99")),
            _ms(r.get("att_p50")), _ms(r.get("att_p99")),
            "-" if ratio is None else f"{ratio:.1f}",
            _pct(r.get("success")), r["verdict"],
            "/".join(_mb(r.get(k)) for k in ("rss_before", "rss_peak", "rss_after")),
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    out.append("")
    for r in rows:
        if r.get("note"):
            out.append(f"{r['scenario']}: {r['note']}")
    return "\n".join(out)


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def relay_options(overrides: dict[str, Any]) -> list[str]:
    """Command-line options for the settings this relay has (a field another branch renamed or
    has not added yet is left out rather than refused)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    out = []
    for name, value in overrides.items():
        if name in fields:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


# --- the relay ---------------------------------------------------------------------------------


EVENT_LOOP = ["--event-loop", "auto"]  # the relay's (--event-loop of this script)


def start_relay(data: Path, overrides: dict[str, Any]) -> Server:
    return Server([sys.executable, "-m", "relay.main", "--listen-fd", "{fd}", "--data",
                   str(data), "--log-level", "warning", *EVENT_LOOP, *relay_options(overrides)])


def rss_mb(relay: Server) -> tuple[float | None, float | None]:
    with contextlib.suppress(OSError, KeyError, ValueError):
        return relay.rss_mb()
    return None, None


class RssPeak:
    """The relay's largest resident memory from start() to stop(), sampled every 0.2 s (its
    lifetime peak, VmHWM, would include the setup's)."""

    def __init__(self, relay: Server) -> None:
        self.relay = relay
        self.peak: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            rss, _ = rss_mb(self.relay)
            if rss is not None:
                self.peak = max(self.peak or 0.0, rss)
            await asyncio.sleep(0.2)

    async def stop(self) -> float | None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        rss, _ = rss_mb(self.relay)
        if rss is not None:
            self.peak = max(self.peak or 0.0, rss)
        return self.peak


# --- the legitimate client ---------------------------------------------------------------------


class Sender:
    def __init__(self, legit: Legit, deposit_id: bytes, token: bytes) -> None:
        self.legit = legit
        self.deposit_id = deposit_id
        self.token = token
        self.conn: RelayClient | None = None
        self.born = 0.0
        self.lock = asyncio.Lock()
        self.inflight: dict[RelayClient, int] = {}

    async def _connection(self) -> tuple[RelayClient, bool]:
        """The sender's connection, and whether this call opened it."""
        async with self.lock:
            now = time.monotonic()
            c = self.conn
            if c is None or c.closed.is_set() or now - self.born > self.legit.reconnect:
                self._retire()
                c = await RelayClient.connect(self.legit.url, session=self.legit.session)
                self.conn, self.born = c, now
                return c, True
            return c, False

    def _retire(self) -> None:
        """Replace the connection; the old one is closed once its deposits have their answer
        (closing it under them would count failures the relay did not cause)."""
        c, self.conn = self.conn, None
        if c is None:
            return

        async def close_when_idle(c: RelayClient) -> None:
            deadline = time.monotonic() + self.legit.timeout + 1
            while self.inflight.get(c, 0) > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await c.close()

        self.legit.spawn(close_when_idle(c))

    async def deposit(self, phase: Phase | None) -> None:
        start = time.perf_counter()
        c: RelayClient | None = None
        opened = False
        try:
            async with asyncio.timeout(self.legit.timeout):
                c, opened = await self._connection()
                self.inflight[c] = self.inflight.get(c, 0) + 1
                await c.deposit(self.deposit_id, os.urandom(BLOCK), token=self.token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, RelayError) and c is not None and c is self.conn:
                self._retire()  # a fresh connection for the next one
            if phase is not None:
                phase.record(start, None, outcome(exc))
            return
        finally:
            if c is not None:
                self.inflight[c] -= 1
                if not self.inflight[c]:
                    del self.inflight[c]
        if phase is not None:
            phase.record(start, time.perf_counter() - start, connected=opened)


class Legit:
    """Owners that receive and acknowledge, senders that deposit on a fixed schedule."""

    def __init__(self, url: str, owners: int = 2, senders: int = 4, rate: float = 20.0,
                 reconnect: float = 2.0,
                 timeout: float = 5.0) -> None:
        self.url = url
        self.owners = owners
        self.nsenders = senders
        self.rate = rate
        self.reconnect = reconnect
        self.timeout = timeout
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.phase: Phase | None = None
        self.senders: list[Sender] = []
        self.owner_conns: set[RelayClient] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.running = True
        self.blob_phase: Phase | None = None

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        setup = await RelayClient.connect(self.url, session=self.session)
        try:
            boxes = []
            for _ in range(self.owners):
                sig, box, token = SigningKey.generate(), PrivateKey.generate(), os.urandom(32)
                created = await setup.create(sig, bytes(box.public_key))
                await setup.token_add(created.owner_id, sig, token)
                boxes.append((created.deposit_id, token))
                self.spawn(self._owner(created.owner_id, sig))
            for i in range(self.nsenders):
                self.senders.append(Sender(self, *boxes[i % len(boxes)]))
        finally:
            await setup.close()
        for i, s in enumerate(self.senders):
            self.spawn(self._schedule(s, i / self.rate))

    async def _owner(self, owner_id: bytes, sig: SigningKey) -> None:
        while self.running:
            try:
                c = await RelayClient.connect(self.url, session=self.session)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            self.owner_conns.add(c)
            try:
                await c.subscribe(owner_id, sig)
                while not c.closed.is_set():
                    try:
                        first = await asyncio.wait_for(c.messages.get(), 1.0)
                    except TimeoutError:
                        continue
                    batch = [first]
                    while not c.messages.empty() and len(batch) < 32:
                        batch.append(c.messages.get_nowait())
                    await c.ack([m.msg_id for m in batch])
            except asyncio.CancelledError:
                raise
            except Exception:  # reconnect; the blocks come again
                pass
            finally:
                self.owner_conns.discard(c)
                await c.close()
            await asyncio.sleep(0.2)

    async def _schedule(self, sender: Sender, offset: float) -> None:
        """Open loop: deposits start on schedule whether or not earlier ones have finished, so
        a stalled relay shows in the latencies instead of slowing the client down."""
        interval = len(self.senders) / self.rate
        nxt = time.monotonic() + offset
        while self.running:
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            nxt += interval
            self.spawn(sender.deposit(self.phase))

    async def measure(self, seconds: float) -> Phase:
        phase = Phase()
        self.phase = phase
        await asyncio.sleep(seconds)
        self.phase = None
        # Deposits started in the window may still be waiting for their answer.
        deadline = time.monotonic() + self.timeout + 1
        expected = math.floor(seconds * self.rate) - 1
        while phase.total < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return phase

    async def blob_probe(self, interval: float = 0.5) -> None:
        """One blob block every `interval` seconds on a connection holding a quota (paid before
        the measured window), into self.blob_phase."""
        c = await RelayClient.connect(self.url, session=self.session)
        self.owner_conns.add(c)
        await c.blob_quota()
        cap = os.urandom(32)
        while self.running:
            phase = self.blob_phase
            start = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout):
                    await c.blob_put(os.urandom(16), cap, os.urandom(BLOCK))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if phase is not None:
                    phase.record(start, None, outcome(exc))
                if not isinstance(exc, RelayError):
                    return
            else:
                if phase is not None:
                    phase.record(start, time.perf_counter() - start)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        self.running = False
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        conns = [s.conn for s in self.senders if s.conn is not None] + list(self.owner_conns)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(c.close() for c in conns),
                                                  return_exceptions=True), 10)
        await self.session.close()


# --- the hostile client (a process of its own) ---------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, exc: BaseException) -> None:
        self.add(outcome(exc))

    def gauge(self, key: str, value: int) -> None:
        self.counts[key] = max(self.counts.get(key, 0), value)


@dataclass
class Hostile:
    url: str
    stats: Stats
    stop: asyncio.Event
    quick: bool
    slow_conns: int
    session: aiohttp.ClientSession
    half_open: int = 400

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlsplit(self.url)
        return u.hostname or "127.0.0.1", u.port or 80

    def emit(self, event: str) -> None:
        print(event, flush=True)

    async def connect(self) -> RelayClient:
        return await RelayClient.connect(self.url, session=self.session)

    async def mailbox(self, c: RelayClient, token: bytes | None = None
                      ) -> tuple[bytes, bytes, SigningKey]:
        """(owner_id, deposit_id, key) of a new mailbox (with the token if given)."""
        sig = SigningKey.generate()
        created = await c.create(sig, bytes(PrivateKey.generate().public_key))
        self.stats.add("mailboxes")
        if token is not None:
            await c.token_add(created.owner_id, sig, token)
        return created.owner_id, created.deposit_id, sig


async def hostile_store(h: Hostile) -> None:
    """Item 1: one connection at a time creating mailboxes, adding tokens and depositing."""
    block, token = os.urandom(BLOCK), os.urandom(32)
    h.emit("ready")
    while not h.stop.is_set():
        try:
            c = await h.connect()
        except Exception as exc:
            h.stats.fail(exc)
            await asyncio.sleep(0.05)
            continue
        boxes: list[bytes] = []
        done = asyncio.Event()

        async def creator(c: RelayClient = c, boxes: list[bytes] = boxes,
                          done: asyncio.Event = done) -> None:
            while not done.is_set():
                if len(boxes) >= 16:
                    await asyncio.sleep(0.01)
                    continue
                try:
                    boxes.append((await h.mailbox(c, token))[1])
                except Exception as exc:
                    h.stats.fail(exc)
                    if not boxes:  # nothing left to do on this connection
                        done.set()
                    await asyncio.sleep(0.05)

        async def worker(c: RelayClient = c, boxes: list[bytes] = boxes,
                         done: asyncio.Event = done) -> None:
            while not done.is_set() and not h.stop.is_set():
                if not boxes:
                    await asyncio.sleep(0.01)
                    continue
                d = random.choice(boxes)
                try:
                    await c.deposit(d, block, token=token)
                    h.stats.add("ok")
                except RelayError as exc:
                    h.stats.fail(exc)
                    if exc.code != wire.E_BUSY and d in boxes:
                        boxes.remove(d)  # full, rate-limited or gone: another one
                except Exception as exc:
                    h.stats.fail(exc)
                    done.set()

        tasks = [asyncio.ensure_future(creator())] + [
            asyncio.ensure_future(worker()) for _ in range(60)]
        stopper = asyncio.ensure_future(h.stop.wait())
        await asyncio.wait([stopper, asyncio.ensure_future(done.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        done.set()
        stopper.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.close(), 2)


async def half_open(h: Hostile, n: int) -> None:
    """n TCP connections that send part of an upgrade request and never finish it; each one the
    relay closes is opened again."""
    host, port = h.host_port
    live = 0

    async def one() -> None:
        nonlocal live
        while not h.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(HOSTILE_SOURCE, 0))
            except OSError:
                h.stats.add("half_open_refused")
                await asyncio.sleep(0.1)
                continue
            h.stats.add("half_open_opened")
            live += 1
            h.stats.gauge("half_open_held_max", live)
            try:
                writer.write(f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())
                await reader.read(1)  # returns when the relay closes it
                h.stats.add("half_open_closed_by_relay")
            except OSError:
                h.stats.add("half_open_closed_by_relay")
            finally:
                live -= 1
                writer.close()

    await asyncio.gather(*(one() for _ in range(n)))


#: Mailboxes item 3's hostile client buys before the attack: one per place it can hold
#: (max_connections, lowered to 1000) and a margin.
STOCK = 1100


async def hostile_connections(h: Hostile) -> None:
    """Item 3: as many subscribed connections as the relay accepts, plus half-open ones. The
    mailboxes are bought before the window (a price paid once, as the scenario's premise says),
    and each connection the relay drops gives its mailbox back to be subscribed again by a new
    connection: the attack holds places, it does not keep creating mailboxes."""
    stock: list[tuple[bytes, SigningKey]] = []
    setup = await h.connect()
    sem = asyncio.Semaphore(60)

    async def buy() -> None:
        async with sem:
            owner_id, _, sig = await h.mailbox(setup)
            stock.append((owner_id, sig))

    await asyncio.gather(*(buy() for _ in range(STOCK)), return_exceptions=True)
    await setup.close()
    h.emit("ready")
    held: list[RelayClient] = []
    halfo = asyncio.ensure_future(half_open(h, h.half_open))
    sem = asyncio.Semaphore(64)

    watchers: set[asyncio.Task[None]] = set()

    async def give_back(c: RelayClient, mb: tuple[bytes, SigningKey]) -> None:
        await c.closed.wait()
        stock.append(mb)

    async def one() -> None:
        try:
            c = await h.connect()
        except Exception as exc:
            h.stats.fail(exc)
            await asyncio.sleep(0.05)  # a refused connection: try again soon
            return
        try:
            if stock:
                mb = stock.pop(0)
            else:
                owner_id, _, sig = await h.mailbox(c)
                mb = (owner_id, sig)
            await c.subscribe(*mb)
            held.append(c)
            h.stats.add("subscribed")
            watch = asyncio.ensure_future(give_back(c, mb))
            watchers.add(watch)
            watch.add_done_callback(watchers.discard)
        except Exception as exc:
            h.stats.fail(exc)
            held.append(c)  # an open connection all the same

    async def gauge() -> None:
        while True:
            h.stats.gauge("held_max", sum(1 for c in held if not c.closed.is_set()))
            await asyncio.sleep(0.5)

    g = asyncio.ensure_future(gauge())
    pending: set[asyncio.Task[None]] = set()
    while not h.stop.is_set():
        await sem.acquire()
        t = asyncio.ensure_future(one())
        pending.add(t)
        t.add_done_callback(pending.discard)
        t.add_done_callback(lambda _: sem.release())
    h.stats.gauge("held_end", sum(1 for c in held if not c.closed.is_set()))
    g.cancel()
    halfo.cancel()


class RawWs:
    """A WebSocket client on a plain socket with a small receive buffer: it reads only what it
    is told to, so it can stop reading (aiohttp's client always reads)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, rcvbuf: int = 4096) -> RawWs:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((HOSTILE_SOURCE, 0))
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, (host, port))
        except BaseException:
            s.close()
            raise
        reader, writer = await asyncio.open_connection(sock=s, limit=16384)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            status = int(head.split()[1]) if len(head.split()) > 1 else 0
            raise HandshakeFailed("no upgrade", status)
        return cls(reader, writer)

    def send(self, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x82, 0x80 | n)
        else:
            head = struct.pack(">BBH", 0x82, 0x80 | 126, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def recv(self) -> bytes:
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(n)
            if b0 & 0x0F == 0x2:
                return payload
            if b0 & 0x0F == 0x8:
                raise RelayClosed()

    async def hello(self) -> bytes:
        self.send(wire.encode(wire.HELLO, 1))
        frame = wire.decode(await self.recv())
        if frame.type != wire.HELLO_OK:
            raise RelayClosed()
        return wire.HelloOk.parse(frame.body).challenge

    def close(self) -> None:
        self.writer.close()


async def hostile_slow(h: Hostile) -> None:
    """Item 5: connections subscribed to many mailboxes with queued blocks, that never read."""
    per_conn, blocks = 40, 33  # 40 x 32 pushed blocks of 16 KiB: ~20 MiB per connection
    n = h.slow_conns
    token, block = os.urandom(32), os.urandom(BLOCK)
    conns = [await h.connect() for _ in range(4)]
    boxes: list[tuple[bytes, bytes, SigningKey]] = []
    # If creating mailboxes has a price, the setup takes what it can get in bounded time.
    deadline = time.monotonic() + (25 if h.quick else 45)
    for i in range(n * per_conn):
        if time.monotonic() > deadline:
            h.stats.add("setup_cut_short")
            break
        try:
            boxes.append(await h.mailbox(conns[i % 4], token))
        except Exception as exc:
            h.stats.fail(exc)
    sem = asyncio.Semaphore(240)

    async def fill(i: int, deposit_id: bytes) -> None:
        async with sem:
            try:
                await conns[i % 4].deposit(deposit_id, block, token=token)
                h.stats.add("queued")
            except Exception as exc:
                h.stats.fail(exc)

    await asyncio.gather(*(fill(i, b[1]) for i, b in enumerate(boxes) for _ in range(blocks)))
    for c in conns:
        await c.close()
    h.emit("staged")
    host, port = h.host_port
    raws: list[RawWs] = []
    for i in range(n):
        try:
            raw = await RawWs.open(host, port)
            challenge = await raw.hello()
        except Exception as exc:
            h.stats.fail(exc)
            continue
        raws.append(raw)
        for owner_id, _, sig in boxes[i * per_conn:(i + 1) * per_conn]:
            rid = random.randrange(1, 1 << 31)
            unsigned = wire.encode(wire.SUBSCRIBE, rid, owner_id)
            s = sig.sign(wire.auth_message(challenge, unsigned)).signature
            raw.send(unsigned + s)
        h.stats.add("slow_connections")
    h.emit("ready")
    await h.stop.wait()
    for raw in raws:
        raw.close()


async def hostile_blob(h: Hostile) -> None:
    """Item 6: blob quotas and uploads as fast as it can. The next quota is paid on a new
    connection while the current one uploads; the first before the measured window (a proof is
    bound to its connection, so it cannot be paid long before)."""
    block = os.urandom(BLOCK)

    async def paid() -> tuple[RelayClient, bytes] | None:
        while not h.stop.is_set():
            c: RelayClient | None = None
            try:
                c = await h.connect()
                await c.blob_quota()
                h.stats.add("quotas")
                return c, os.urandom(32)
            except Exception as exc:
                h.stats.fail(exc)
                if c is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(c.close(), 2)
                await asyncio.sleep(0.05)
        return None

    current = await paid()
    h.emit("ready")
    while current is not None and not h.stop.is_set():
        c, cap = current
        following = asyncio.ensure_future(paid())
        spent = asyncio.Event()

        async def worker(c: RelayClient = c, cap: bytes = cap,
                         spent: asyncio.Event = spent) -> None:
            while not spent.is_set() and not h.stop.is_set():
                try:
                    await c.blob_put(os.urandom(16), cap, block)
                    h.stats.add("ok")
                except RelayError as exc:
                    h.stats.fail(exc)
                    if exc.code != wire.E_BUSY:
                        spent.set()  # quota spent or area full: on to the next quota
                except Exception as exc:
                    h.stats.fail(exc)
                    spent.set()

        await asyncio.gather(*(worker() for _ in range(60)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.close(), 2)
        current = await following


async def hostile_writer(h: Hostile) -> None:
    """Item 8: four senders with 60 deposits in flight each, into mailboxes whose owner
    acknowledges everything (so the queues never fill and the writer never rests)."""
    block, token = os.urandom(BLOCK), os.urandom(32)
    tasks: list[asyncio.Future[Any]] = []
    for _ in range(4):
        owner = await h.connect()
        sender = await h.connect()
        boxes = []
        for _ in range(8):
            owner_id, deposit_id, sig = await h.mailbox(owner, token)
            await owner.subscribe(owner_id, sig)
            boxes.append(deposit_id)

        async def acker(owner: RelayClient = owner) -> None:
            sem = asyncio.Semaphore(32)
            acks: set[asyncio.Task[None]] = set()
            while not owner.closed.is_set():
                batch = [await owner.messages.get()]
                while not owner.messages.empty() and len(batch) < 32:
                    batch.append(owner.messages.get_nowait())
                await sem.acquire()

                async def ack(ids: list[bytes]) -> None:
                    try:
                        await owner.ack(ids)
                        h.stats.add("acked", len(ids))
                    except Exception as exc:
                        h.stats.fail(exc)
                    finally:
                        sem.release()

                t = asyncio.ensure_future(ack([m.msg_id for m in batch]))
                acks.add(t)
                t.add_done_callback(acks.discard)

        async def worker(sender: RelayClient = sender, boxes: list[bytes] = boxes) -> None:
            while not h.stop.is_set() and not sender.closed.is_set():
                try:
                    await sender.deposit(random.choice(boxes), block, token=token)
                    h.stats.add("ok")
                except Exception as exc:
                    h.stats.fail(exc)

        tasks.append(asyncio.ensure_future(acker()))
        tasks += [asyncio.ensure_future(worker()) for _ in range(60)]
    h.emit("ready")
    await h.stop.wait()
    for t in tasks:
        t.cancel()


HOSTILES: dict[str, Callable[[Hostile], Awaitable[None]]] = {
    "1": hostile_store, "3": hostile_connections, "3t": hostile_connections, "5": hostile_slow,
    "6": hostile_blob, "8": hostile_writer,
}


async def hostile_async(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stats = Stats()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        limit=0, local_addr=(HOSTILE_SOURCE, 0)))
    h = Hostile(args.url, stats, stop, args.quick, args.slow_conns, session, args.half_open)
    task = asyncio.ensure_future(HOSTILES[args.hostile](h))
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done() and not task.cancelled() and task.exception() is not None:
        stats.add("crashed: " + type(task.exception()).__name__)
    print("stats " + json.dumps(stats.counts), flush=True)
    # Thousands of connections need no polite close: the process ends, the kernel closes them.
    os._exit(0)


# --- the scenarios ------------------------------------------------------------------------------


def raise_nofile() -> None:
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def overrides_for(name: str) -> dict[str, Any]:
    """Settings a scenario changes. Except in item 1, whose attack is buying mailboxes, CREATE's
    proof of work (if the relay asks one) is cheap: as if the hostile client had created its
    mailboxes ahead of time, which a price per mailbox cannot prevent, and so that the setup
    (the legitimate client's mailboxes too) fits in the run."""
    out: dict[str, Any] = {} if name == "1" else {"pow_create_bits": 8}
    if name in ("3", "3t"):
        out["max_connections"] = 1000
    if name == "3":
        # A relay reached directly: the hostile client's address is a source of its own (the
        # bench runs on loopback, which the relay exempts unless told), capped at a tenth of the
        # places. "3t": the same flood where every client arrives from loopback (an onion
        # service, a reverse proxy): no source to cap; Tor's or the proxy's limits bound it.
        out["source_cap_loopback"] = True
        out["source_connections"] = 100
    if name == "6":
        out["blob_max_bytes"] = 256 * 1024 * 1024
    return out


class HostileProcess:
    def __init__(self, name: str, url: str, args: argparse.Namespace, log: Path) -> None:
        self.name = name
        self.url = url
        self.args = args
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.events: asyncio.Queue[str] = asyncio.Queue()
        self.stats: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--hostile", self.name,
               "--url", self.url, "--slow-conns", str(self.args.slow_conns),
               "--half-open", str(self.args.half_open)]
        if self.args.quick:
            cmd.append("--quick")
        with self.log.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err,
                preexec_fn=lambda: os.nice(10))
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            text = line.decode(errors="replace").strip()
            if text.startswith("stats "):
                self.stats = json.loads(text[6:])
            else:
                await self.events.put(text)
        await self.events.put("exited")

    async def wait_for(self, event: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = await asyncio.wait_for(self.events.get(),
                                             max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return False
            if got == event:
                return True
            if got == "exited":
                return False

    async def stop(self) -> dict[str, int]:
        if self.proc is None:
            return {}
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)
        return self.stats


def _row(name: str, base: Phase, att: Phase) -> dict[str, Any]:
    ratio, result = verdict(base, att)
    return {
        "scenario": name, "title": TITLES[name],
        "base_p50": percentile(base.latencies, 50), "base_p99": percentile(base.latencies, 99),
        "base_n": base.total, "base_success": base.success,
        "att_p50": percentile(att.latencies, 50), "att_p99": percentile(att.latencies, 99),
        "att_n": att.total, "success": att.success, "ratio_p99": ratio, "verdict": result,
        "att_failures": att.failures,
    }


async def run_attack(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = tmp / f"relay-{name}"
    relay = start_relay(data, overrides_for(name))
    legit: Legit | None = None
    hostile: HostileProcess | None = None
    try:
        await relay.wait_ready("/health")
        url = f"http://127.0.0.1:{relay.port}/v1/ws"
        legit = Legit(url)
        await legit.start()
        if name == "6":
            legit.spawn(legit.blob_probe())
        await asyncio.sleep(1)  # warm up
        base_blob = legit.blob_phase = Phase()
        base = await legit.measure(args.baseline)
        legit.blob_phase = None
        if args.timeline:
            print_timeline(name + " baseline", base)
        rss_before, _ = rss_mb(relay)
        hostile = HostileProcess(name, url, args, tmp / f"hostile-{name}.log")
        await hostile.start()
        note = ""
        if name == "5" and await hostile.wait_for("staged", 120):
            rss_before, _ = rss_mb(relay)
        ready = await hostile.wait_for("ready", 120)
        sampler = RssPeak(relay)
        sampler.start()
        att_blob = legit.blob_phase = Phase()
        att = await legit.measure(args.attack)
        legit.blob_phase = None
        if args.timeline:
            print_timeline(name, att)
        stats = await hostile.stop()
        hostile = None
        await asyncio.sleep(2)
        peak = await sampler.stop()
        rss_after, _ = rss_mb(relay)
        row = _row(name, base, att)
        row.update(rss_before=rss_before, rss_peak=peak, rss_after=rss_after, hostile=stats)
        if not ready:
            note += "hostile client never got ready (see its log); "
        if name == "5" and rss_before is not None and row["rss_peak"] is not None:
            n = stats.get("slow_connections", 0)
            bound = rss_before + n * DOCUMENTED_BUFFER / 2**20
            row["rss_bound"] = bound
            grew = row["rss_peak"] - rss_before
            note += (f"{n} non-reading connections: relay grew {grew:.0f} MB, documented "
                     f"bound {n} x 2 MiB = {n * 2} MB ({grew / max(1, n * 2):.1f}x); after they "
                     f"closed {rss_after:.0f} MB (before {rss_before:.0f}); ")
            # 25 % above the bound for what the allocator and the kernel's buffers add.
            row["verdict_memory"] = "PASS" if row["rss_peak"] <= bound * 1.25 else "FAIL"
            row["verdict"] += f", mem {row['verdict_memory']}"
        if name == "6":
            row["legit_blob_base"] = base_blob.success
            row["legit_blob_attacked"] = att_blob.success
            blob_ok = (att_blob.success or 0.0) >= MIN_SUCCESS
            row["verdict"] += ", blob " + ("PASS" if blob_ok else "FAIL")
            note += (f"legitimate blob puts ok {_pct(base_blob.success)} % alone, "
                     f"{_pct(att_blob.success)} % under attack"
                     + (f" ({counts_text(att_blob.failures)})" if att_blob.failures else "")
                     + "; ")
        if att.failures:
            note += f"legitimate failures: {counts_text(att.failures)}; "
        note += f"hostile got: {counts_text(stats) or 'nothing'}"
        row["note"] = note
        return row
    finally:
        if hostile is not None:
            await hostile.stop()
        if legit is not None:
            await legit.stop()
        relay.stop()
        shutil.rmtree(data, ignore_errors=True)


async def fill_and_drain(url: str, args: argparse.Namespace, legit: Legit
                         ) -> dict[str, Any]:
    """An owner fills its mailboxes until deposits fail (the disk is full), then drains them."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    token, block = os.urandom(32), os.urandom(BLOCK)
    res: dict[str, Any] = {"stored": 0, "fill_errors": {}, "acked": 0, "ack_errors": {}}
    try:
        c = await RelayClient.connect(url, session=session)
        boxes = [await _new_box(c, token) for _ in range(16)]
        t0 = time.monotonic()
        last_ok = t0
        stop = asyncio.Event()

        async def worker() -> None:
            nonlocal last_ok
            while not stop.is_set():
                try:
                    await c.deposit(random.choice(boxes)[1], block, token=token)
                    res["stored"] += 1
                    last_ok = time.monotonic()
                except RelayError as exc:
                    k = outcome(exc)
                    res["fill_errors"][k] = res["fill_errors"].get(k, 0) + 1
                    # full: nothing stored for 2 s although the relay answers
                    if time.monotonic() - last_ok > 2:
                        stop.set()
                    await asyncio.sleep(0.01)
                if time.monotonic() - t0 > 90:
                    stop.set()

        await asyncio.gather(*(worker() for _ in range(48)))
        res["fill_s"] = last_ok - t0
        await c.close()
        # Full: what the legitimate client gets meanwhile.
        res["full_phase"] = await legit.measure(2 if args.quick else 3)
        legit.phase = drain = Phase()
        t_drain = time.perf_counter()
        res["t_drain"] = t_drain
        deadline = time.monotonic() + args.recover
        while time.monotonic() < deadline:
            # The owner drains: subscribe to every mailbox, acknowledge what comes.
            try:
                o = await RelayClient.connect(url, session=session)
            except Exception:
                await asyncio.sleep(0.5)
                continue
            try:
                for owner_id, _, sig in boxes:
                    await o.subscribe(owner_id, sig)
                while time.monotonic() < deadline:
                    try:
                        first = await asyncio.wait_for(o.messages.get(), 1.0)
                    except TimeoutError:
                        if recovery_time(drain.events, t_drain, run=5) is not None:
                            break
                        continue
                    batch = [first]
                    while not o.messages.empty() and len(batch) < 32:
                        batch.append(o.messages.get_nowait())
                    await o.ack([m.msg_id for m in batch])
                    res["acked"] += len(batch)
                else:
                    continue
                break  # drained (nothing more came) and the legitimate deposits succeed
            except Exception as exc:
                k = outcome(exc)
                res["ack_errors"][k] = res["ack_errors"].get(k, 0) + 1
                await asyncio.sleep(0.5)  # acknowledgements failed: reconnect, try again
            finally:
                await o.close()
        # Deposits must keep succeeding, not only while the drain has just freed some room.
        await asyncio.sleep(3)
        legit.phase = None
        res["drain"] = drain
        return res
    finally:
        await session.close()


async def _new_box(c: RelayClient, token: bytes) -> tuple[bytes, bytes, SigningKey]:
    sig = SigningKey.generate()
    created = await c.create(sig, bytes(PrivateKey.generate().public_key))
    await c.token_add(created.owner_id, sig, token)
    return created.owner_id, created.deposit_id, sig


def tmpfs_size_mb() -> int:
    """64 MiB to fill, beside the free space the relay keeps in reserve (if it keeps one)."""
    reserve = int(getattr(Config(), "disk_reserve", 0) or 0)
    return 64 + math.ceil(reserve / 2**20)


async def run_disk(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    mnt = tmp / "tmpfs"
    mnt.mkdir()
    size = args.tmpfs_mb or tmpfs_size_mb()
    skipped: dict[str, Any] = {"scenario": "disk", "title": TITLES["disk"], "verdict": "SKIP"}
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(mnt)],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        skipped["note"] = f"skipped: cannot mount a tmpfs ({type(exc).__name__}; needs root)"
        return skipped
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        skipped["note"] = f"skipped: cannot mount a tmpfs (needs root): {msg[0]}"
        return skipped
    relay: Server | None = None
    legit: Legit | None = None
    try:
        relay = start_relay(mnt / "data", overrides_for("disk"))
        await relay.wait_ready("/health")
        url = f"http://127.0.0.1:{relay.port}/v1/ws"
        legit = Legit(url)
        await legit.start()
        await asyncio.sleep(1)
        base = await legit.measure(args.baseline)
        rss_before, _ = rss_mb(relay)
        sampler = RssPeak(relay)
        sampler.start()
        res = await fill_and_drain(url, args, legit)
        full: Phase = res["full_phase"]
        drain: Phase = res["drain"]
        rec = recovery_time(drain.events, res["t_drain"])
        peak = await sampler.stop()
        rss_after, _ = rss_mb(relay)
        row = _row("disk", base, drain)
        row.update(rss_before=rss_before, rss_peak=peak, rss_after=rss_after,
                   recovery_s=rec, fill_s=res["fill_s"], stored=res["stored"],
                   acked=res["acked"], full_success=full.success,
                   verdict="PASS" if rec is not None else "FAIL")
        row["note"] = (
            f"{size} MiB tmpfs filled in {res['fill_s']:.1f} s ({res['stored']:,} blocks; then "
            f"{counts_text(res['fill_errors']) or 'no errors'}); while full the legitimate "
            f"deposits got {_pct(full.success)} % ok"
            + (f" ({counts_text(full.failures)})" if full.failures else "")
            + f"; the owner acknowledged {res['acked']:,}"
            + (f" (ack failures: {counts_text(res['ack_errors'])})" if res["ack_errors"] else "")
            + "; deposits succeed again "
            + (f"{rec:.1f} s after the drain began" if rec is not None
               else f"NOT within {args.recover:.0f} s")
            + "; the 'att' columns are the deposits during the drain")
        return row
    finally:
        if legit is not None:
            await legit.stop()
        if relay is not None:
            relay.stop()
        r2 = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        if r2.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


async def main_async(args: argparse.Namespace) -> None:
    raise_nofile()
    names = [n.strip() for n in args.scenario.split(",")] if args.scenario else list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            raise SystemExit(f"unknown scenario {n!r} (one of {', '.join(SCENARIOS)})")
    if not args.json:
        print(f"legitimate client: 2 owners, 4 senders, 20 deposits/s, a fresh connection per "
              f"sender every 2 s; baseline {args.baseline:.0f} s, attack {args.attack:.0f} s; "
              f"pass: p99 <= {MAX_RATIO:.0f}x baseline and >= {MIN_SUCCESS:.0%} ok; "
              f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aegis-attack-") as td:
        tmp = Path(td)
        for n in names:
            try:
                row = await (run_disk(args, tmp) if n == "disk" else run_attack(n, args, tmp))
            except Exception as exc:  # a relay that refuses the setup: say so, go on
                traceback.print_exc(file=sys.stderr)
                row = {"scenario": n, "title": TITLES[n], "verdict": "ERROR",
                       "note": f"the scenario could not run: {outcome(exc)}"}
            rows.append(row)
            if not args.json:
                lines = format_table([row]).splitlines()
                if len(rows) == 1:
                    print("\n".join(lines[:2]))
                print(lines[2], flush=True)
    if args.json:
        print(json.dumps({"rows": rows, "seconds": time.monotonic() - t0}, indent=1,
                         default=str))
    else:
        print()
        print(format_table(rows))
        print(f"\n({time.monotonic() - t0:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run (under 2 minutes)")
    p.add_argument("--timeline", action="store_true",
                   help="print the attacked window's p99 second by second")
    p.add_argument("--scenario", default="", help="comma-separated: 1,3,5,6,8,disk (all)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="the relay's event loop (aegis-relay --event-loop)")
    p.add_argument("--baseline", type=float, default=None, help="seconds alone (10; quick 3)")
    p.add_argument("--attack", type=float, default=None, help="seconds attacked (20; quick 8)")
    p.add_argument("--recover", type=float, default=None,
                   help="seconds the full disk has to recover (30; quick 10)")
    p.add_argument("--slow-conns", type=int, default=None, help="item 5's connections (8; 4)")
    p.add_argument("--half-open", type=int, default=400,
                   help="item 3's half-open connections, each reopened when closed (400)")
    p.add_argument("--tmpfs-mb", type=int, default=0,
                   help="size of the full-disk tmpfs (64 MiB plus the relay's disk reserve)")
    p.add_argument("--hostile", choices=sorted(HOSTILES), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    EVENT_LOOP[1] = args.event_loop
    defaults = {"baseline": (10, 3), "attack": (20, 8), "recover": (30, 10),
                "slow_conns": (8, 4)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    if args.hostile:
        raise_nofile()
        asyncio.run(hostile_async(args))
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
