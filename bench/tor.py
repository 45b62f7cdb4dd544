"""Tor benchmark: daemons with their own managed Tor on a private Tor network on loopback.

    .venv/bin/python bench/tor.py [--messages 20] [--starts 3]

Starts a private Tor network (tests/tornet.py: three authorities, an exit, a middle relay, an
onion-service host, all on 127.0.0.x), three relays (one reached directly, one through the
exit, one published as the onion service) and three pairs of daemons, and prints, in the same
run:

  * start-up: from starting a daemon (mode tor, its Tor's state wiped: a cold start; then with
    its state kept: a warm start) to the first message it receives, which its contact queued at
    the relay before; target under 60 s cold on this network;
  * send -> message.received latency, median of --messages, through Tor via the exit and via
    the onion service, beside a pair connected directly to a relay on loopback (the baseline)
    measured in the same run, and the ratios;
  * the managed Tor's resident memory (VmRSS) once idle, beside the daemon's own.

Nothing is asserted; the network is on loopback, so the figures are Tor's processing and
circuit building, not the internet's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aegis_cli.client import Client  # noqa: E402
from tests.support.procs import child  # noqa: E402
from tests.tornet import TorNetwork  # noqa: E402

TARGET_START_S = 60.0
FAST_POW = ["--pow-deposit-bits", "8", "--pow-bundle-bits", "8", "--pow-blob-bits", "8",
    "--pow-create-bits", "8"]


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"bench: timed out waiting for {what}")


def aegis(home: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "aegis_cli.main", *args, "--home", str(home)],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"bench: aegis {args[0]} failed: {r.stderr.strip()}")
    return r.stdout


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def tor_pid(daemon: int) -> int | None:
    """The managed Tor: the daemon's child named tor."""
    return child(daemon, "tor")


class Bench:
    def __init__(self, base: Path, torrc: Path) -> None:
        self.base = base
        self.torrc = torrc
        self.procs: list[subprocess.Popen[bytes]] = []
        self.keep = False  # keep the directory (a failure to look into)
        self.daemons: dict[Path, subprocess.Popen[bytes]] = {}

    def relay(self, name: str, port: int) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.main", "--host", "127.0.0.1", "--port", str(port),
             "--data", str(self.base / name), *FAST_POW],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.procs.append(proc)
        time.sleep(0.5)
        return f"ws://127.0.0.1:{port}/v1/ws"

    def profile(self, name: str, relay_url: str, *init: str) -> Path:
        home = self.base / name
        aegis(home, "init", "--no-passphrase", "--relay", relay_url, *init)
        return home

    def start(self, home: Path) -> float:
        env = {**os.environ, "AEGISD_TOR_EXTRA_TORRC": str(self.torrc)}
        t0 = time.monotonic()
        log = open(self.base / f"{home.name}.log", "ab")  # noqa: SIM115 (the child's)
        self.daemons[home] = subprocess.Popen(
            [sys.executable, "-m", "aegisd.main", "run", "--home", str(home), "--test-methods",
             "--log-level", "debug"],
            stdout=subprocess.DEVNULL, stderr=log, env=env,
        )  # fmt: skip
        log.close()
        wait_until(lambda: (home / "aegisd.sock").exists(), "the daemon's socket")
        return t0

    def stop(self, home: Path) -> None:
        proc = self.daemons.pop(home)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # its tasks' stacks, into its log
            time.sleep(1)
            proc.kill()
            proc.wait()
            self.keep = True
            msg = f"bench: {home.name} did not stop; see {self.base}/{home.name}.log"
            raise SystemExit(msg) from None

    def close(self) -> None:
        for home in list(self.daemons):
            self.stop(home)
        for p in self.procs:
            p.terminate()
            p.wait(10)


def call(home: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    with Client(home / "aegisd.sock", timeout=60) as c:
        return c.call(method, params)


def connected(home: Path) -> bool:
    return bool(call(home, "status")["relay"]["connected"])


def pair(b: Bench, tag: str, relay_url: str, *init: str) -> tuple[Path, Path]:
    alice = b.profile(f"{tag}-alice", relay_url, *init)
    bob = b.profile(f"{tag}-bob", relay_url, *init)
    for home in (alice, bob):
        b.start(home)
        # Tor's latency, not the cover slots' (an onion relay has cover on by default).
        call(home, "privacy.set", {"level": "off"})
    for home in (alice, bob):
        wait_until(lambda h=home: connected(h), f"{tag}: the relay")  # type: ignore[misc]
    link = aegis(bob, "invite").strip()
    aegis(alice, "name", "alice")
    aegis(alice, "contact", "add", "bob", link)
    wait_until(lambda: any(c["established"] for c in call(alice, "contacts.list")["contacts"]),
               f"{tag}: the contact")  # fmt: skip
    wait_until(lambda: call(bob, "contacts.list")["contacts"], f"{tag}: the contact at bob")
    return alice, bob


def latencies(alice: Path, bob: Path, n: int) -> list[float]:
    out = []
    with Client(alice / "aegisd.sock", timeout=120) as a, Client(bob / "aegisd.sock",
                                                                  timeout=120) as b:  # fmt: skip
        b.call("events.subscribe", {"types": ["message.received"]})
        notes = b.notifications()
        for i in range(n + 1):
            t0 = time.perf_counter()
            mid = a.call("messages.send", {"contact": "bob", "text": f"bench {i}"})["message_id"]
            while next(notes)["params"]["data"]["message_id"] != mid:
                pass
            if i:  # the first one warms up
                out.append((time.perf_counter() - t0) * 1000)
    return out


def first_message_after_start(b: Bench, alice: Path, bob: Path, cold: bool) -> float:
    """Stop bob, queue a message for him, start him: seconds until it is received."""
    b.stop(bob)
    if cold:
        shutil.rmtree(bob / "tor", ignore_errors=True)
    mid = call(alice, "messages.send", {"contact": "bob", "text": "while you were away"})
    mid = mid["message_id"]
    wait_until(lambda: any(m["message_id"] == mid and m["status"] != "queued"
                           for m in call(alice, "messages.history",
                                         {"contact": "bob"})["messages"]),
               "the message to reach the relay")  # fmt: skip
    t0 = b.start(bob)
    got = wait_until(lambda: any(m.get("message_id") == mid for m in _received(bob)),
                     "the queued message")  # fmt: skip
    assert got
    return time.monotonic() - t0


def _received(home: Path) -> list[dict[str, Any]]:
    evs = call(home, "events.list", {"types": ["message.received"], "limit": 1000})["events"]
    return [e["data"] for e in evs]


def med(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else xs * 9
    return f"median {statistics.median(xs):7.1f} ms (p10 {q[0]:.1f}, p90 {q[-1]:.1f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20, help="messages per latency figure")
    ap.add_argument("--starts", type=int, default=3, help="cold and warm starts each")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="aegis-tor-", dir="/tmp"))
    net = TorNetwork(base / "net")
    b: Bench | None = None
    try:
        t = time.monotonic()
        net.start()
        print(f"private Tor network usable after {time.monotonic() - t:.1f} s "
              f"({json.dumps({k: round(v, 1) for k, v in net.startup_times.items()})})")
        torrc = base / "testnet.torrc"
        torrc.write_text("\n".join(net.client_torrc_lines()) + "\n")
        b = Bench(base, torrc)
        direct_url = b.relay("relay-direct", _free_port())
        exit_url = b.relay("relay-exit", net.exit_ports[0])
        b.relay("relay-onion", net.onion_port)
        onion_url = f"ws://{net.onion_hostname}/v1/ws"

        d_alice, d_bob = pair(b, "direct", direct_url)
        e_alice, e_bob = pair(b, "exit", exit_url, "--tor")
        o_alice, o_bob = pair(b, "onion", onion_url)

        base_ms = latencies(d_alice, d_bob, args.messages)
        exit_ms = latencies(e_alice, e_bob, args.messages)
        onion_ms = latencies(o_alice, o_bob, args.messages)
        print(f"send -> message.received, direct (baseline)   {med(base_ms)}")
        for label, xs in (("through Tor, relay via the exit", exit_ms),
                          ("through Tor, onion relay", onion_ms)):  # fmt: skip
            ratio = statistics.median(xs) / statistics.median(base_ms)
            print(f"send -> message.received, {label:20} {med(xs)}  = {ratio:.1f} x direct")

        for cold in (True, False):
            for label, (alice, bob) in (("exit", (e_alice, e_bob)), ("onion", (o_alice, o_bob))):
                runs = [first_message_after_start(b, alice, bob, cold) for _ in range(args.starts)]
                m = statistics.median(runs)
                each = ", ".join(f"{r:.1f}" for r in runs)
                target = ""
                if cold:
                    target = (f"; target < {TARGET_START_S:.0f} s: "
                              f"{'met' if m < TARGET_START_S else 'NOT met'}")  # fmt: skip
                print(f"daemon start -> first message received, {'cold' if cold else 'warm'} "
                      f"Tor, {label:5}: median {m:5.1f} s (runs {each}){target}")  # fmt: skip

        time.sleep(5)
        for home in (e_alice, o_bob):
            daemon = b.daemons[home].pid
            pid = tor_pid(daemon)
            if pid is not None:
                print(f"idle memory ({home.name}): managed Tor VmRSS {rss_mb(pid):6.1f} MB, "
                      f"aegisd VmRSS {rss_mb(daemon):6.1f} MB")
        d_pid = b.daemons[d_alice].pid
        print(f"idle memory (direct-alice): aegisd VmRSS {rss_mb(d_pid):6.1f} MB (no Tor)")
    finally:
        if b is not None:
            b.close()
        net.stop()
        if b is None or not b.keep:
            shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
