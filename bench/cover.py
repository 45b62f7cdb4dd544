"""Cover traffic benchmark: what a privacy level costs (docs/threat-model.md §4.2).

    .venv/bin/python bench/cover.py [--seconds 60] [--interval 0.2] [--messages 30]

Starts a relay and two daemons (alice and bob, one contact) on loopback and measures, in the
same run:

  * CPU: each daemon's CPU time (user + system, /proc) over --seconds with cover at a
    compressed mean interval (--interval seconds per contact, the mechanism of every level,
    only faster), beside the same time with cover off (the idle baseline); the difference per
    block, and what that makes per contact per day at each level's real interval;
  * blocks and bytes per contact per day at each level (72 and 720 blocks of 16,384 bytes);
  * latency: from messages.send to the contact's message.received, with cover at the
    compressed interval, beside cover off: the wait for a slot should be about the interval
    (exponential: mean = interval, median = 0.69 x interval).

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aegis_cli.client import Client, DaemonNotRunning  # noqa: E402
from aegisd.services.cover import LEVELS  # noqa: E402

BLOCK = 16384
DAY = 86400.0
FAST_POW = ["--pow-deposit-bits", "8", "--pow-bundle-bits", "8", "--pow-blob-bits", "8",
    "--pow-create-bits", "8"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(home: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    with Client(home / "aegisd.sock", timeout=60) as c:
        return c.call(method, params)


def wait(pred: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except (OSError, DaemonNotRunning):
            v = None
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit(f"bench: timed out waiting for {what}")


def aegis(home: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "aegis_cli.main", *args, "--home", str(home)],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"bench: aegis {args[0]} failed: {r.stderr.strip()}")
    return r.stdout


def latencies(alice: Path, bob: Path, n: int) -> list[float]:
    out = []
    with Client(alice / "aegisd.sock", timeout=600) as a, Client(bob / "aegisd.sock",
                                                                  timeout=600) as b:  # fmt: skip
        b.call("events.subscribe", {"types": ["message.received"]})
        notes = b.notifications()
        for i in range(n):
            t0 = time.perf_counter()
            mid = a.call("messages.send", {"contact": "bob", "text": f"bench {i}"})["message_id"]
            while next(notes)["params"]["data"]["message_id"] != mid:
                pass
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="CPU measuring time per phase")
    ap.add_argument("--interval", type=float, default=0.2, help="compressed mean interval, s")
    ap.add_argument("--messages", type=int, default=30, help="messages per latency figure")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="aegis-cover-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "relay.main", "--host", "127.0.0.1", "--port", str(port),
             "--data", str(base / "relay"), *FAST_POW],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        url = f"ws://127.0.0.1:{port}/v1/ws"
        homes = {}
        pids = {}
        for name in ("alice", "bob"):
            home = base / name
            aegis(home, "init", "--no-passphrase", "--relay", url)
            proc = subprocess.Popen(
                [sys.executable, "-m", "aegisd.main", "run", "--home", str(home),
                 "--test-methods"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(proc)
            homes[name], pids[name] = home, proc.pid
            wait(lambda h=home: call(h, "status")["relay"]["connected"], "the relay")
        alice, bob = homes["alice"], homes["bob"]
        link = aegis(bob, "invite").strip()
        aegis(alice, "contact", "add", "bob", link)
        wait(lambda: any(c["established"] for c in call(alice, "contacts.list")["contacts"]),
             "the contact")  # fmt: skip
        wait(lambda: call(bob, "contacts.list")["contacts"], "the contact at bob")
        off_ms = latencies(alice, bob, args.messages)

        def phase(level: str) -> tuple[dict[str, float], dict[str, int]]:
            for h in (alice, bob):
                params: dict[str, Any] = {"level": level}
                if level != "off":
                    params["interval"] = args.interval
                call(h, "privacy.set", params)
            time.sleep(2.0)  # settle (pool mailboxes, first ticks)
            before = {n: cpu_seconds(p) for n, p in pids.items()}
            sent0 = call(alice, "privacy.get")["slots"]["sent"]
            time.sleep(args.seconds)
            cpu = {n: cpu_seconds(p) - before[n] for n, p in pids.items()}
            sent1 = call(alice, "privacy.get")["slots"]["sent"]
            return cpu, {k: sent1[k] - sent0.get(k, 0) for k in sent1}

        idle_cpu, _ = phase("off")
        cover_cpu, sent = phase("default")
        on_ms = latencies(alice, bob, args.messages)
        blocks = sum(sent.values())  # alice's blocks at ticks (contact + loop), over the phase
        extra = cover_cpu["alice"] - idle_cpu["alice"]
        per_block = extra / blocks if blocks else float("nan")
        print(f"alice sent {blocks} blocks at ticks in {args.seconds:.0f} s "
              f"(interval {args.interval} s: {sent})")
        print(f"CPU over {args.seconds:.0f} s: cover off (baseline) alice "
              f"{idle_cpu['alice']:.2f} s, bob {idle_cpu['bob']:.2f} s; cover on alice "
              f"{cover_cpu['alice']:.2f} s, bob {cover_cpu['bob']:.2f} s")
        print(f"CPU per block sent (and the contact's received, in the same daemon): "
              f"{per_block * 1000:.2f} ms")
        for level, interval in LEVELS.items():
            if interval is None:
                continue
            n = DAY / interval
            # per contact: n blocks sent and n received, plus n loop blocks per pool mailbox
            print(f"level {level:7}: {n:.0f} blocks ({n * BLOCK / 1e6:.2f} MB) per contact per "
                  f"day each way; CPU about {n * per_block:.1f} s per contact per day; "
                  f"{2 * n:.0f} wake-ups per contact per day; mean added latency "
                  f"{interval / 60:.0f} min")
        med_off, med_on = statistics.median(off_ms), statistics.median(on_ms)
        mean_on = statistics.mean(on_ms)
        print(f"send -> received, cover off: median {med_off:.1f} ms; cover on at "
              f"{args.interval} s: median {med_on:.0f} ms, mean {mean_on:.0f} ms "
              f"(a slot's wait: mean {args.interval * 1000:.0f} ms, median "
              f"{0.693 * args.interval * 1000:.0f} ms expected)")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
