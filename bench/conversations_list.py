"""conversations.list with many groups: what one call costs (issue 17).

    .venv/bin/python bench/conversations_list.py [--groups 40] [--members 16] [--calls 15]
                                                 [--baseline DIR]

A real daemon (a subprocess, on a real SQLCipher profile with no passphrase, no relay) serves
``conversations.list`` over its socket. The profile is made beforehand in this process: GROUPS
groups of MEMBERS members each (every member added by a signed change, so each log holds a
base and a chain as a real group's does), each with one incoming message. The figure is the
wall time of one call, the first and the median of the next CALLS.

``--baseline DIR``: the same profile is served, in the same run, by the daemon of another
checkout (for example ``git archive main | tar -x -C DIR``), then by this one: the
figures side by side.

Figures (2026-12-04, two cores shared with other test runs; baseline: main at 8884dff, which
parsed every group's log on every call; after: services/group_logs.py):

    | groups x members | baseline: first, median | after: first, median |
    |------------------|-------------------------|----------------------|
    | 10 x 8           | 57 ms, 31 ms            | 45 ms, 2.2 ms        |
    | 40 x 16          | 180 ms, 165 ms          | 158 ms, 2.1 ms       |
    | 100 x 32         | 975 ms, 1270 ms         | 1565 ms, 26 ms       |

The first call after unlock still parses every log (as before); the next ones parse none.

Nothing here is asserted: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aegis_cli.client import Client, DaemonNotRunning
from aegisd.core import group as core
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.store import create_profile
from aegisd.store import groups as G

ROOT = Path(__file__).resolve().parents[1]


def make_profile(home: Path, groups: int, members: int) -> None:
    entropy = SystemEntropy()
    store = create_profile(home, None)
    try:
        for g in range(groups):
            owner = IdentityKeyPair.generate(entropy)
            log = core.GroupLog(core.create_group(entropy, owner, f"group {g}"))
            others = [IdentityKeyPair.generate(entropy) for _ in range(members - 1)]
            for m in others:
                log.receive(core.add_member(owner, log.head, m.public))
            rows = [(m.key, m.role) for m in log.head.members]
            with store.transaction():
                ref = G.add_group(store, log.head.group_id, log.record().to_bytes(), rows)
                G.add_message(store, ref, os.urandom(16), "in", f"hello from group {g}",
                              sender_key=others[0].public.ed_pub,
                              sent_at=int(time.time() * 1000))  # fmt: skip
    finally:
        store.close()


def measure(root: Path, home: Path, calls: int) -> tuple[float, float, int]:
    """(first call s, median of the next ``calls`` s, conversations listed)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegisd.main", "run", "--home", str(home)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env, cwd=root,
    )  # fmt: skip
    sock = home / "aegisd.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(sock, timeout=5) as c:
                    c.call("version")
                break
            except (DaemonNotRunning, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("aegisd did not start") from None
                time.sleep(0.05)
        with Client(sock, timeout=600) as c:
            times, n = [], 0
            for _ in range(calls + 1):
                t0 = time.perf_counter()
                n = len(c.call("conversations.list")["conversations"])
                times.append(time.perf_counter() - t0)
            c.call("daemon.stop")
        proc.wait(timeout=60)
        return times[0], statistics.median(times[1:]), n
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=40)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--baseline", type=Path, help="another checkout's root, served first")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cl", dir="/tmp"))
    try:
        home = tmp / "p"
        t0 = time.perf_counter()
        make_profile(home, args.groups, args.members)
        print(f"{args.groups} groups of {args.members} members made in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        runs = ([("baseline", args.baseline)] if args.baseline else []) + [("this", ROOT)]
        for label, root in runs:
            first, med, n = measure(root, home, args.calls)
            print(f"{label:8}  conversations.list ({n} conversations): first call "
                  f"{first * 1000:8.1f} ms, median of the next {args.calls} "
                  f"{med * 1000:8.1f} ms")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
