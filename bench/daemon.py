"""Daemon benchmark: `aegis send` as a whole process, send-to-event latency, idle memory.

    .venv/bin/python bench/daemon.py [--runs 30] [--messages 100] [--idle 5]

Starts its own relay (cheap proofs of work) and two daemons (alice and bob, profiles without
passphrase) under a temporary directory, as `make demo` does, connects them with a one-time
invitation, then measures, in the same run:

  * the baseline: the wall time of `python -c pass` (the interpreter's own start-up);
  * `aegis send bob TEXT` as a whole process (the console script users run), from start to its
    exit once the daemon has accepted the message;
  * the latency from calling `messages.send` on alice's socket to bob's `message.received`
    event arriving on a subscribed connection (relay on loopback);
  * the resident memory (VmRSS) of both daemons after `--idle` seconds without traffic, beside
    that of a bare `python -c 'import time; time.sleep(60)'`.

Targets (reported, not asserted): `aegis send` <= 100 ms median, send-to-event <= 50 ms median,
idle memory <= 80 MB. Nothing here is asserted: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aegis_cli.client import Client  # noqa: E402
from aegisd.demo import Stage, aegis, wait_until  # noqa: E402

TARGET_SEND_MS = 100.0
TARGET_EVENT_MS = 50.0
TARGET_RSS_MB = 80.0


def wall(argv: list[str], runs: int) -> list[float]:
    """Wall times in ms of running argv to completion, `runs` times (after one warm-up)."""
    subprocess.run(argv, capture_output=True, check=True)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def connect(stage: Stage) -> None:
    alice, bob = stage.home("alice"), stage.home("bob")
    for home in (alice, bob):
        wait_until(functools.partial(_connected, home), "the relay link")
    link = aegis(bob, "invite").stdout.strip()
    aegis(alice, "contact", "add", "bob", link)
    for home, name in ((bob, "alice"), (alice, "bob")):
        wait_until(functools.partial(_established, home, name), "the contact")


def _connected(home: Path) -> bool:
    with Client(home / "aegisd.sock") as c:
        return bool(c.call("status")["relay"]["connected"])


def _established(home: Path, name: str) -> bool:
    with Client(home / "aegisd.sock") as c:
        return any(
            x["name"] == name and x["established"] for x in c.call("contacts.list")["contacts"]
        )


def send_to_event(stage: Stage, messages: int) -> list[float]:
    out = []
    with (
        Client(stage.home("alice") / "aegisd.sock", timeout=30) as alice,
        Client(stage.home("bob") / "aegisd.sock", timeout=30) as bob,
    ):
        bob.call("events.subscribe", {"types": ["message.received"]})
        notes = bob.notifications()
        for i in range(messages + 1):
            t0 = time.perf_counter()
            mid = alice.call("messages.send", {"contact": "bob", "text": f"bench {i}"})[
                "message_id"
            ]
            while True:
                ev = next(notes)["params"]
                if ev["data"]["message_id"] == mid:
                    break
            if i:  # the first one warms up
                out.append((time.perf_counter() - t0) * 1000)
    return out


def med(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else xs * 9
    return f"median {statistics.median(xs):6.1f} ms (p10 {q[0]:.1f}, p90 {q[-1]:.1f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="process runs per wall-time figure")
    ap.add_argument("--messages", type=int, default=100, help="messages for send-to-event")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading RSS")
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

        script = Path(sys.executable).parent / "aegis"
        aegis_argv = [str(script)] if script.exists() else [sys.executable, "-m", "aegis_cli.main"]
        home = str(stage.home("alice"))

        print(f"python {sys.version.split()[0]}; aegis: {' '.join(aegis_argv)}")
        base_ms = wall([sys.executable, "-c", "pass"], args.runs)
        print(f"baseline  python -c pass         {med(base_ms)}")
        send_ms = wall([*aegis_argv, "send", "bob", "bench message", "--home", home], args.runs)
        print(f"aegis send (whole process)       {med(send_ms)}")
        ratio = statistics.median(send_ms) / statistics.median(base_ms)
        print(
            f"  = {ratio:.1f} x python -c pass; target <= {TARGET_SEND_MS:.0f} ms: "
            f"{'met' if statistics.median(send_ms) <= TARGET_SEND_MS else 'NOT met'}"
        )
        ev_ms = send_to_event(stage, args.messages)
        print(f"send -> message.received         {med(ev_ms)}")
        print(
            f"  target <= {TARGET_EVENT_MS:.0f} ms: "
            f"{'met' if statistics.median(ev_ms) <= TARGET_EVENT_MS else 'NOT met'}"
        )

        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            time.sleep(args.idle)  # receipts (random delay <= receipt_delay_max) go out first
            bare_rss = rss_mb(bare.pid)
            for name, proc in stage.daemons.items():
                mb = rss_mb(proc.pid)
                print(
                    f"idle aegisd ({name:5}) VmRSS      {mb:6.1f} MB "
                    f"(bare python {bare_rss:.1f} MB); target <= {TARGET_RSS_MB:.0f} MB: "
                    f"{'met' if mb <= TARGET_RSS_MB else 'NOT met'}"
                )
        finally:
            bare.kill()
            bare.wait()
    finally:
        stage.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
