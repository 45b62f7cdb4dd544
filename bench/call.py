"""Call benchmark: time from dial (`calls.start`) to the first media frame at the callee.

    .venv/bin/python bench/call.py [--calls 10]

Starts its own relay and two daemons (alice and bob, as bench/daemon.py does) under a temporary
directory, connects them, restricts ICE host candidates to 127.0.0.1 (calls.host_candidates =
"loopback": nothing leaves loopback), then, --calls times: alice dials, bob answers as soon as
his `call.incoming` event arrives, and the clock stops at bob's `call.media` event (the first
audio frame decoded from alice). The call is then hung up and both sides wait for `ended`.

Baseline, measured in the same run: two bare aiortc peer connections in this process on
loopback doing offer/answer and receiving the first audio frame (the floor: no relay, no
ratchet, no daemons). Also printed: each daemon's resident memory before its first call (aiortc
not loaded yet) and after the calls. Nothing is asserted: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aegis_cli.client import Client  # noqa: E402
from aegisd.demo import Stage, aegis  # noqa: E402
from bench.daemon import connect, med, rss_mb  # noqa: E402


def _until(notes: Any, want: str, call_id: str | None) -> dict[str, Any]:
    while True:
        ev = next(notes)["params"]
        data: dict[str, Any] = ev["data"]
        if ev["type"] == want and (call_id is None or data.get("call_id") == call_id):
            return data


def daemon_calls(stage: Stage, n: int) -> tuple[list[float], list[float]]:
    """(dial -> first media at the callee, answer -> first media) in ms, per call."""
    dial_ms, answer_ms = [], []
    alice_sock, bob_sock = stage.home("alice") / "aegisd.sock", stage.home("bob") / "aegisd.sock"
    with (
        Client(alice_sock, timeout=60) as alice, Client(bob_sock, timeout=60) as bob,
        Client(alice_sock, timeout=60) as alice_ev, Client(bob_sock, timeout=60) as bob_ev,
    ):  # fmt: skip
        bob_ev.call("events.subscribe", {"types": ["call.*"]})
        alice_ev.call("events.subscribe", {"types": ["call.state"]})
        bob_notes, alice_notes = bob_ev.notifications(), alice_ev.notifications()
        for i in range(n + 1):
            t0 = time.perf_counter()
            call_id = alice.call("calls.start", {"contact": "bob"})["call_id"]
            _until(bob_notes, "call.incoming", call_id)
            t1 = time.perf_counter()
            bob.call("calls.accept", {"call_id": call_id})
            _until(bob_notes, "call.media", call_id)
            t2 = time.perf_counter()
            if i:  # the first call loads aiortc: a warm-up
                dial_ms.append((t2 - t0) * 1000)
                answer_ms.append((t2 - t1) * 1000)
            alice.call("calls.hangup", {"call_id": call_id})
            while _until(alice_notes, "call.state", call_id)["state"] != "ended":
                pass
            while _until(bob_notes, "call.state", call_id)["state"] != "ended":
                pass
    return dial_ms, answer_ms


async def _bare_once() -> float:
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    got = asyncio.get_running_loop().create_future()
    readers: list[asyncio.Task[None]] = []
    a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    b = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    @b.on("track")
    def on_track(track: Any) -> None:
        async def first() -> None:
            await track.recv()
            if not got.done():
                got.set_result(time.perf_counter())

        readers.append(asyncio.ensure_future(first()))

    t0 = time.perf_counter()
    a.addTrack(AudioStreamTrack())
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    b.addTrack(AudioStreamTrack())
    await b.setLocalDescription(await b.createAnswer())
    await a.setRemoteDescription(b.localDescription)
    t1: float = await asyncio.wait_for(got, 30)
    await a.close()
    await b.close()
    return (t1 - t0) * 1000


def bare_aiortc(n: int) -> list[float]:
    from aegisd.calls.engine import restrict_host_candidates_to_loopback

    restrict_host_candidates_to_loopback()
    asyncio.run(_bare_once())  # warm-up
    return [asyncio.run(_bare_once()) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10, help="calls to time (after one warm-up)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="aegis-bench-call-", dir="/tmp"))
    stage = Stage(base)
    try:
        stage.start_relay()
        for name in ("alice", "bob"):
            aegis(stage.home(name), "init", "--no-passphrase", "--relay", stage.relay_url)
            stage.start_daemon(name)
            aegis(stage.home(name), "name", name)
            aegis(stage.home(name), "call-settings", "--host-candidates", "loopback")
        connect(stage)
        print(f"python {sys.version.split()[0]}; {args.calls} calls, loopback, relay on loopback")
        floor = bare_aiortc(args.calls)
        print(f"baseline  bare aiortc offer/answer -> first frame   {med(floor)}")
        idle = {name: rss_mb(proc.pid) for name, proc in stage.daemons.items()}
        dial, answer = daemon_calls(stage, args.calls)
        print(f"calls.start -> callee call.media (auto-answer)      {med(dial)}")
        print(f"  of which calls.accept -> callee call.media        {med(answer)}")
        ratio = statistics.median(dial) / statistics.median(floor)
        print(f"  = {ratio:.1f} x the bare aiortc floor")
        for name, proc in stage.daemons.items():  # aiortc is loaded by the first call only
            print(f"aegisd ({name:5}) VmRSS idle before any call {idle[name]:6.1f} MB, "
                  f"after the calls {rss_mb(proc.pid):6.1f} MB")
    finally:
        stage.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
