"""Device-link benchmark: the time to link a new device, beside a message's latency.

    .venv/bin/python bench/devices.py [--runs 5] [--messages 20]

Starts its own relay (cheap proofs of work) and two daemons (alice and bob, connected by an
invitation) under a temporary directory, as bench/daemon.py does, then measures in the same
run:

  * the baseline: `messages.send` on alice's socket to bob's `message.received` event (one
    block through the relay on loopback);
  * linking a new device to alice, `--runs` times (at most 5: a profile has at most 6
    devices), each into a fresh profile with its daemon already connected: from calling
    `devices.link` on alice to both sides reporting `done`, the codes confirmed on both at
    once (by RPC: the human pauses are left out). Also the time until both show the code;
  * the fan-out (docs/devices.md §5): bob's `messages.send` to `message.received` on each of
    alice's devices, once bob's daemon has a session with each, beside the same latency
    measured before the first link (alice on one device), `--messages` each.

Nothing here is asserted: it is a measurement, not a test. The link's own mailboxes are polled
every 0.25 s (aegisd/services/devices.py POLL), which bounds how fast each step is seen.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aegis_cli.client import Client  # noqa: E402
from aegisd.demo import Stage, aegis, wait_until  # noqa: E402
from bench.daemon import _connected, connect, med, send_to_event  # noqa: E402


def _state(home: Path) -> dict[str, Any]:
    with Client(home / "aegisd.sock") as c:
        link: dict[str, Any] = c.call("devices.status")["link"] or {}
        return link


def _in_state(home: Path, state: str) -> bool:
    return _state(home).get("state") == state


def _call(home: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    with Client(home / "aegisd.sock", timeout=60) as c:
        return c.call(method, params)


def link_once(stage: Stage, name: str) -> tuple[float, float]:
    alice, new = stage.home("alice"), stage.home(name)
    aegis(new, "init", "--no-passphrase", "--relay", stage.relay_url)
    stage.start_daemon(name)
    wait_until(lambda: _connected(new), "the relay link")
    t0 = time.perf_counter()
    link = _call(alice, "devices.link")["link"]
    _call(new, "devices.join", {"link": link})
    for home in (alice, new):
        wait_until(functools.partial(_in_state, home, "code"), "the code")
    t_code = time.perf_counter() - t0
    code = _call(new, "devices.status")["link"]["code"]  # E's user types what N shows
    _call(alice, "devices.confirm", {"code": code})
    _call(new, "devices.confirm", {"accept": True})
    for home in (alice, new):
        wait_until(functools.partial(_in_state, home, "done"), "the end")
    return t_code * 1000, (time.perf_counter() - t0) * 1000


def _established_everywhere(stage: Stage, names: list[str]) -> bool:
    for name in names:
        contacts = _call(stage.home(name), "contacts.list")["contacts"]
        if not contacts or not contacts[0]["established"]:
            return False
    return True


def _everywhere(arrived: dict[str, dict[str, float]], mid: str) -> bool:
    return all(mid in got for got in arrived.values())


def bob_to_devices(stage: Stage, names: list[str], messages: int) -> dict[str, list[float]]:
    """Bob sends; the time until each of alice's devices (``names``) emits message.received,
    each read by a thread of its own (so that no device waits for another's read)."""
    arrived: dict[str, dict[str, float]] = {n: {} for n in names}
    clients = [Client(stage.home(n) / "aegisd.sock", timeout=None) for n in names]

    def read(name: str, client: Client) -> None:
        client.call("events.subscribe", {"types": ["message.received"]})
        ready.release()
        with contextlib.suppress(OSError, ValueError):  # until the socket is shut down
            for note in client.notifications():
                data = note["params"]["data"]
                arrived[name][data["message_id"]] = time.perf_counter()

    ready = threading.Semaphore(0)
    for n, c in zip(names, clients, strict=True):
        threading.Thread(target=read, args=(n, c), daemon=True).start()
    for _ in names:
        ready.acquire()
    out: dict[str, list[float]] = {n: [] for n in names}
    try:
        with Client(stage.home("bob") / "aegisd.sock", timeout=30) as bob:
            for i in range(messages + 1):
                t0 = time.perf_counter()
                mid = bob.call("messages.send", {"contact": "alice", "text": f"fan {i}"})[
                    "message_id"
                ]
                wait_until(functools.partial(_everywhere, arrived, mid), "every device")
                if i:  # the first one warms up
                    for n in names:
                        out[n].append((arrived[n][mid] - t0) * 1000)
    finally:
        for c in clients:  # wakes its reader thread, blocked on the socket, then closes
            with contextlib.suppress(OSError):
                c._sock.shutdown(socket.SHUT_RDWR)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="links to make (1 to 5)")
    ap.add_argument("--messages", type=int, default=20, help="messages for the baseline")
    args = ap.parse_args()
    runs = max(1, min(5, args.runs))

    base = Path(tempfile.mkdtemp(prefix="aegis-bench-", dir="/tmp"))
    stage = Stage(base)
    try:
        stage.start_relay()
        for name in ("alice", "bob"):
            aegis(stage.home(name), "init", "--no-passphrase", "--relay", stage.relay_url)
            stage.start_daemon(name)
            aegis(stage.home(name), "name", name)
        connect(stage)
        print(f"baseline  send -> message.received   {med(send_to_event(stage, args.messages))}")
        one = bob_to_devices(stage, ["alice"], args.messages)["alice"]
        print(f"bob -> alice, one device             {med(one)}")
        codes, totals = [], []
        for i in range(runs):
            code_ms, total_ms = link_once(stage, f"new{i}")
            codes.append(code_ms)
            totals.append(total_ms)
        print(f"link: devices.link -> both done      {med(totals)}")
        print(f"link: devices.link -> both show code {med(codes)}")
        names = ["alice", *(f"new{i}" for i in range(runs))]
        # Bob learns each list, fetches each new device's bundle, and the device answers.
        wait_until(lambda: _established_everywhere(stage, names[1:]), "bob's sessions")
        wait_until(lambda: len(_call(stage.home("bob"), "events.list", {
            "types": ["contact.devices"], "limit": 100})["events"]) >= runs, "the answers")
        for name, xs in bob_to_devices(stage, names, args.messages).items():
            label = "first device" if name == "alice" else f"linked device {name}"
            print(f"bob -> alice, {len(names)} devices: {label:20} {med(xs)}")
    finally:
        stage.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
