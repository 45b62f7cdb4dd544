"""Calls between real daemons through a real relay, on loopback only (docs/protocol.md §21).

Media runs peer to peer (host candidates restricted to 127.0.0.1 by calls.host_candidates =
"loopback"), or through a real coturn on 127.0.0.1 in the hide-my-IP test.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis_client import Client
from tests.daemon.conftest import DaemonProc
from tests.relay.conftest import RelayProcess

from .calls_support import (
    RecordingProxy,
    analyse,
    coturn,
    dump,
    media_libraries_mapped,
    open_files,
    sdp_leaks,
    udp_sockets,
    write_tone,
)
from .conftest import Peer, connect
from .sound_server import PulseAudio

T_CALL = 45.0


@pytest.fixture
def proxy(relay_proc: RelayProcess) -> Iterator[RecordingProxy]:
    p = RecordingProxy(relay_proc.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def make(
    tmp_short: Path, proxy: RecordingProxy, sound: PulseAudio
) -> Iterator[Callable[..., Peer]]:
    """Peers whose every relay connection passes the recording proxy; each has a microphone and
    a speaker (the test PulseAudio's) for the calls made without --play / --record."""
    made: list[Peer] = []
    url = f"ws://127.0.0.1:{proxy.port}/v1/ws"

    def _make(name: str, test_methods: bool = False) -> Peer:
        p = Peer(tmp_short / name, url, name)
        made.append(p)
        p.stop()
        extra = ["--test-methods"] if test_methods else []
        p.proc = DaemonProc(p.home, extra, sound.daemon_env(name))
        p.proc.wait_ready()
        p.call("calls.configure", {"host_candidates": "loopback"})
        return p

    try:
        yield _make
    finally:
        for p in made:
            p.stop()


def pid(p: Peer) -> int:
    assert p.proc is not None
    return p.proc.proc.pid


def cli(p: Peer, *args: str) -> Any:
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(p.home), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def event(p: Peer, type_: str, since: int = 0, **match: Any) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for ev in p.events(since, types=[type_]):
            if all(ev["data"].get(k) == v for k, v in match.items()):
                return dict(ev["data"])
        return None

    found: dict[str, Any] = p.wait_for(find, f"{type_} {match}", timeout=T_CALL)
    return found


def released(p: Peer, *paths: Path) -> bool:
    """No UDP socket left, and none of the media files open."""
    files = open_files(pid(p))
    return not udp_sockets(pid(p)) and not any(str(f) in files for f in paths)


def test_audio_call_tone_through_cli_relay_sees_nothing(
    make: Callable[..., Peer], tmp_short: Path, relay_proc: RelayProcess, proxy: RecordingProxy
) -> None:
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    # aiortc is imported only when a call starts: an idle daemon maps none of its libraries.
    for p in (alice, bob):
        assert media_libraries_mapped(pid(p)) == []
        assert udp_sockets(pid(p)) == []
    tone, rec = tmp_short / "tone.wav", tmp_short / "rec.wav"
    write_tone(tone, 440.0, 3.0)

    started = cli(alice, "call", "bob", "--play", str(tone), "--no-wait")
    call_id = started["call_id"]
    assert started["state"] == "calling" and started["direction"] == "out"
    incoming = event(bob, "call.incoming", call_id=call_id)
    assert incoming == {"call_id": call_id, "contact": "alice", "video": False}
    assert media_libraries_mapped(pid(bob)) == []  # ringing needs no media stack
    answered = cli(bob, "answer", "--record", str(rec))
    assert answered["state"] == "connecting"

    event(bob, "call.media", call_id=call_id, kind="audio")
    event(alice, "call.state", call_id=call_id, state="active")
    event(bob, "call.state", call_id=call_id, state="active")
    for p in (alice, bob):
        assert media_libraries_mapped(pid(p))  # the check above can see them
        live = p.call("calls.list")["calls"]
        assert [c["state"] for c in live] == ["active"]
        transport = live[0]["transport"]
        assert transport["selected"] == {"local": "host", "remote": "host"}
        assert transport["remote"] == ["host"]
        # Every socket ICE gathered on (a host candidate is its socket's address): loopback.
        sockets = udp_sockets(pid(p))
        assert sockets and all(s.startswith("127.0.0.1:") for s in sockets), sockets

    # A second call while one is in progress is refused by the API.
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "call", "bob", "--no-wait", "--home",
         str(alice.home)], capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1 and "call is in progress" in r.stderr

    # Wait for 2.5 s of the tone to be recorded (48 kHz, 2 channels, 16 bit), then hang up.
    bob.wait_for(lambda: rec.exists() and rec.stat().st_size > 2.5 * 48000 * 4, "the recording")
    ended = cli(bob, "hangup")
    assert ended["call_id"] == call_id
    event(alice, "call.state", call_id=call_id, state="ended", reason="remote_hangup")
    event(bob, "call.state", call_id=call_id, state="ended", reason="hangup")
    # Hangup released the peer connection, its UDP sockets, the player and the recorder.
    alice.wait_for(lambda: released(alice, tone), "alice's media to be released")
    bob.wait_for(lambda: released(bob, rec), "bob's media to be released")
    assert alice.call("calls.list")["calls"] == [] == bob.call("calls.list")["calls"]

    duration, hz = analyse(rec)
    assert 2.0 <= duration <= 4.0, duration
    assert abs(hz - 440.0) < 10, hz

    history = cli(alice, "calls")["history"]
    assert [(c["call_id"], c["direction"], c["state"], c["reason"]) for c in history] == [
        (call_id, "out", "ended", "remote_hangup")
    ]
    assert history[0]["answered_at"] is not None

    # Nothing of the SDP, the candidates or the fingerprints reached the relay, its disk, the
    # traffic to and from it, the events or the history.
    for stream in proxy.payload_bytes():
        assert sdp_leaks(stream) == [] and b"127.0.0.1" not in stream
    assert sum(len(s) for s in proxy.payload_bytes()) > 0
    relay_proc.close()
    for f in relay_proc.data.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert sdp_leaks(data) == [] and b"127.0.0.1" not in data, f.name
    assert sdp_leaks(relay_proc.output().encode()) == []
    for p in (alice, bob):
        assert sdp_leaks(dump(p.events())) == []
        assert sdp_leaks(dump(p.call("calls.history"))) == []
    # Nor the daemons' logs (aegisd logs at info by default; aioice's info lines name the
    # addresses of every candidate pair it checks).
    for p in (alice, bob):
        p.stop()
        assert p.proc is not None
        log = p.proc.stderr()
        assert sdp_leaks(log.encode()) == [] and "127.0.0.1" not in log, log[-2000:]


def test_video_call_bad_signaling_rejected_caller_hangs_up(make: Callable[..., Peer]) -> None:
    alice, bob = make("alice"), make("bob", test_methods=True)
    connect(alice, bob)

    async def client(*steps: tuple[str, dict[str, Any]]) -> list[Any]:
        """Alice's side through the asyncio client library (aegis_client)."""
        async with await Client.connect(alice.home) as c:
            return [await getattr(c, name)(**kw) for name, kw in steps]

    (started,) = asyncio.run(client(("start_call", {"contact": "bob", "video": True})))
    assert started["state"] == "calling" and started["video"] is True
    call_id = started["call_id"]
    assert event(bob, "call.incoming", call_id=call_id)["video"] is True
    bob.call("calls.accept", {"call_id": call_id})
    event(bob, "call.media", call_id=call_id, kind="video")
    event(bob, "call.media", call_id=call_id, kind="audio")
    event(alice, "call.state", call_id=call_id, state="active")

    # Bob's daemon sends alice a HANGUP whose box is tampered with, a replay of its ANSWER
    # (in a fresh ratchet message: only the per-call sequence number can tell), and a HANGUP
    # for a call id that does not exist. A message sent after them marks when all arrived.
    for mode in ("tamper", "replay", "unknown"):
        bob.call("debug.call_signal", {"call_id": call_id, "mode": mode})
    bob.call("messages.send", {"contact": "alice", "text": "after the bad signaling"})
    event(alice, "message.received", text="after the bad signaling")
    live = alice.call("calls.list")["calls"]
    assert [(c["call_id"], c["state"]) for c in live] == [(call_id, "active")]
    assert [e for e in alice.events(types=["call.state"]) if e["data"]["state"] == "ended"] == []

    # The caller hangs up: both sides release everything.
    live, ended = asyncio.run(client(("calls", {}), ("hangup", {})))
    assert [c["call_id"] for c in live] == [call_id] and live[0]["media"] == ["audio", "video"]
    assert ended["state"] == "ended"
    event(bob, "call.state", call_id=call_id, state="ended", reason="remote_hangup")
    alice.wait_for(lambda: released(alice), "alice's media to be released")
    bob.wait_for(lambda: released(bob), "bob's media to be released")


def test_crossed_calls_one_goes_on(make: Callable[..., Peer], proxy: RecordingProxy) -> None:
    """Both call each other at once (each INVITE leaves before the other's arrives): without a
    rule both would answer the other busy and nobody could talk. The lower call id goes on."""
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    proxy.pause()  # nothing crosses the relay until both calls have started
    try:
        a = alice.call("calls.start", {"contact": "bob"})["call_id"]
        b = bob.call("calls.start", {"contact": "alice"})["call_id"]
    finally:
        proxy.resume()
    win, lose = sorted((a, b))
    caller, callee = (alice, bob) if win == a else (bob, alice)
    event(callee, "call.state", call_id=lose, state="ended", reason="crossed")
    event(callee, "call.incoming", call_id=win)
    assert [(c["call_id"], c["state"]) for c in callee.call("calls.list")["calls"]] == [
        (win, "ringing")
    ]
    # The call that goes on rings at the callee, which says so (docs/protocol.md §21.1).
    event(caller, "call.state", call_id=win, state="ringing")
    callee.call("calls.accept", {"call_id": win})
    event(caller, "call.state", call_id=win, state="active")
    event(callee, "call.state", call_id=win, state="active")
    caller_history = {c["call_id"]: c for c in caller.call("calls.history")["calls"]}
    assert (caller_history[lose]["state"], caller_history[lose]["reason"]) == ("ended", "crossed")
    caller.call("calls.hangup", {})
    event(callee, "call.state", call_id=win, state="ended", reason="remote_hangup")
    caller.wait_for(lambda: released(caller), "the caller's media to be released")
    callee.wait_for(lambda: released(callee), "the callee's media to be released")
    # Each call ended exactly once on each side.
    for p in (alice, bob):
        ends = [e["data"]["call_id"] for e in p.events(types=["call.state"])
                if e["data"]["state"] == "ended"]  # fmt: skip
        assert sorted(ends) == sorted({win} | ({lose} if p is callee else set())), ends


def test_sealed_fingerprint_is_the_one_checked(make: Callable[..., Peer]) -> None:
    """Bob's daemon seals an ANSWER whose DTLS fingerprint is not that of the certificate it
    presents: alice's daemon refuses the handshake, the call fails, no media flows to her."""
    alice, bob = make("alice"), make("bob", test_methods=True)
    connect(alice, bob)
    call_id = alice.call("calls.start", {"contact": "bob"})["call_id"]
    event(bob, "call.incoming", call_id=call_id)
    # The RINGING leaves after a receipt's delay (an ACCEPT before it would drop it).
    event(alice, "call.state", call_id=call_id, state="ringing")
    bob.call("debug.call_signal", {"call_id": call_id, "mode": "fingerprint"})
    bob.call("calls.accept", {"call_id": call_id})
    event(alice, "call.state", call_id=call_id, state="ended", reason="failed")
    event(bob, "call.state", call_id=call_id, state="ended")
    # Bob's side may have finished its half of the handshake (alice's fingerprint is right)
    # before alice refused; alice's never connected.
    states = [e["data"]["state"] for e in alice.events(types=["call.state"])]
    assert states == ["calling", "ringing", "connecting", "ended"], states
    assert alice.events(types=["call.media"]) == []
    alice.wait_for(lambda: released(alice), "alice's media to be released")
    bob.wait_for(lambda: released(bob), "bob's media to be released")


def test_daemon_stop_during_a_call_hangs_up(make: Callable[..., Peer]) -> None:
    """Stopping a daemon (SIGTERM) in a call ends it as a hangup: the peer is told at once (it
    does not wait for ICE consent to expire) and the stopped side's history says hangup."""
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    call_id = alice.call("calls.start", {"contact": "bob"})["call_id"]
    event(bob, "call.incoming", call_id=call_id)
    bob.call("calls.accept", {"call_id": call_id})
    event(alice, "call.state", call_id=call_id, state="active")
    event(bob, "call.state", call_id=call_id, state="active")
    alice.stop()
    event(bob, "call.state", call_id=call_id, state="ended", reason="remote_hangup")
    bob.wait_for(lambda: released(bob), "bob's media to be released")
    alice.start()
    last = alice.call("calls.history", {"limit": 1})["calls"][0]
    assert (last["call_id"], last["state"], last["reason"]) == (call_id, "ended", "hangup")


def test_busy_reject_and_offline_contact(make: Callable[..., Peer]) -> None:
    alice, bob, carol = make("alice"), make("bob"), make("carol")
    connect(alice, bob)
    connect(carol, bob)
    first = alice.call("calls.start", {"contact": "bob"})["call_id"]
    event(bob, "call.incoming", call_id=first)
    # Ringing needs no media stack: the callee maps none of it. The caller checked its sound
    # devices (PortAudio, and the system's ALSA plugins: their rate converter maps the system's
    # libavcodec) but loaded neither PyAV nor aiortc's SRTP.
    assert media_libraries_mapped(pid(bob)) == []
    assert not {"/av/", "pylibsrtp"} & set(media_libraries_mapped(pid(alice)))
    # A second incoming call while one rings: answered busy; the first goes on ringing.
    second = carol.call("calls.start", {"contact": "bob"})["call_id"]
    event(carol, "call.state", call_id=second, state="ended", reason="busy")
    event(bob, "call.missed", call_id=second, reason="busy")
    assert [(c["call_id"], c["state"]) for c in bob.call("calls.list")["calls"]] == [
        (first, "ringing")
    ]
    # And while one is active: busy again, and the active call goes on.
    bob.call("calls.accept", {"call_id": first})
    event(alice, "call.state", call_id=first, state="active")
    third = carol.call("calls.start", {"contact": "bob"})["call_id"]
    event(carol, "call.state", call_id=third, state="ended", reason="busy")
    event(bob, "call.missed", call_id=third, reason="busy")
    assert [(c["call_id"], c["state"]) for c in bob.call("calls.list")["calls"]] == [
        (first, "active")
    ]
    assert [(c["call_id"], c["state"]) for c in alice.call("calls.list")["calls"]] == [
        (first, "active")
    ]
    # `aegis calls` lists oldest first: the ended calls, then the one in progress, last.
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "calls", "--home", str(bob.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    listed = [re.search(r"\[([0-9a-f]{32})\]$", x).group(1)  # type: ignore[union-attr]
              for x in r.stdout.strip().splitlines()]  # fmt: skip
    assert listed == [second, third, first], r.stdout
    assert ": active" in r.stdout.strip().splitlines()[-1], r.stdout
    alice.call("calls.hangup", {"call_id": first})
    event(bob, "call.state", call_id=first, state="ended", reason="remote_hangup")

    # Declined.
    fourth = carol.call("calls.start", {"contact": "bob"})["call_id"]
    event(bob, "call.incoming", call_id=fourth)
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "decline", "--home", str(bob.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    event(carol, "call.state", call_id=fourth, state="ended", reason="rejected")
    # None of carol's calls got to media (its sound devices were checked: see above).
    assert not {"/av/", "pylibsrtp"} & set(media_libraries_mapped(pid(carol)))

    # `aegis call` interrupted (Ctrl-C) hangs up: bob's ringing call ends missed.
    seq = bob.events()[-1]["seq"]
    follow = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "call", "bob", "--home", str(carol.home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As from a terminal: a suite started in the background (sh's `&`) ignores SIGINT,
        # and its children would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        ringing = event(bob, "call.incoming", since=seq, contact="carol")
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 130 and "interrupted" in err, err
    event(bob, "call.state", call_id=ringing["call_id"], state="ended", reason="missed")
    assert carol.call("calls.list")["calls"] == []

    # Bob's daemon is killed while a call rings: after the restart the call is in his history
    # as missed, not left ringing. A call to a contact whose daemon is not running ends
    # unanswered after the ring timeout; `aegis call` follows it and says so.
    carol.call("calls.configure", {"ring_timeout": 2})
    fifth = carol.call("calls.start", {"contact": "bob"})["call_id"]
    event(bob, "call.incoming", call_id=fifth)
    bob.kill()
    event(carol, "call.state", call_id=fifth, state="ended", reason="unanswered")
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "call", "bob", "--home", str(carol.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "call to bob: calling" in r.stdout
    assert r.stderr.strip() == "aegis: error: the call ended: unanswered"
    last = carol.call("calls.history", {"limit": 1})["calls"][0]
    assert (last["contact"], last["state"], last["reason"]) == ("bob", "ended", "unanswered")
    # Bob comes back: the call he slept through (its INVITE and the CANCEL after it were waiting
    # in his mailbox; two blocks, so wait for the second) is a missed call.
    bob.start()
    bob.wait_for(
        lambda: any(c["call_id"] == last["call_id"] and c["state"] == "ended"
                    for c in bob.call("calls.history")["calls"]),
        "the missed call in bob's history",
    )  # fmt: skip
    history = {c["call_id"]: c for c in bob.call("calls.history")["calls"]}
    missed = history[last["call_id"]]
    assert (missed["state"], missed["reason"], missed["direction"]) == ("ended", "missed", "in")
    assert bob.call("calls.list")["calls"] == []
    assert [history[c]["reason"] for c in (first, second, third, fourth, fifth)] == [
        "remote_hangup", "busy", "busy", "rejected", "missed"
    ]
    assert history[fifth]["state"] == "ended"


def test_hide_my_ip_relays_through_coturn(make: Callable[..., Peer], tmp_short: Path) -> None:
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    turn_dir = tmp_short / "turn"
    turn_dir.mkdir()
    with coturn(turn_dir) as turn:
        secret_file = tmp_short / "turn-password"
        secret_file.write_text(turn.password + "\n")
        for p in (alice, bob):
            shown = cli(p, "call-settings", "--turn-url", turn.url, "--turn-username", turn.user,
                        "--turn-password-file", str(secret_file), "--hide-ip")  # fmt: skip
            assert shown["hide_ip"] is True and shown["turn_password_set"] is True
            assert turn.password not in json.dumps(shown)
        tone, rec = tmp_short / "tone.wav", tmp_short / "rec.wav"
        write_tone(tone, 1000.0, 2.0)
        call_id = alice.call("calls.start", {"contact": "bob", "play": str(tone)})["call_id"]
        event(bob, "call.incoming", call_id=call_id)
        bob.call("calls.accept", {"call_id": call_id, "record": str(rec)})
        event(bob, "call.media", call_id=call_id, kind="audio")
        event(alice, "call.state", call_id=call_id, state="active")
        for p in (alice, bob):
            transport = p.call("calls.list")["calls"][0]["transport"]
            # Only relay candidates were gathered and offered; media goes relay to relay.
            assert transport["local"] == ["relay"] and transport["remote"] == ["relay"]
            assert transport["selected"] == {"local": "relay", "remote": "relay"}
        bob.wait_for(lambda: rec.exists() and rec.stat().st_size > 1.2 * 48000 * 4, "recording")
        bob.call("calls.hangup", {})
        event(alice, "call.state", call_id=call_id, state="ended", reason="remote_hangup")
        alice.wait_for(lambda: released(alice, tone), "alice's media to be released")
        bob.wait_for(lambda: released(bob, rec), "bob's media to be released")
        _, hz = analyse(rec)
        assert abs(hz - 1000.0) < 15, hz
        # Both daemons allocated a relay on the coturn and bound a channel to the peer.
        log = turn.log_text()
        assert log.count("ALLOCATE processed, success") >= 2
        assert log.count("CHANNEL_BIND processed, success") >= 2
        for p in (alice, bob):
            assert turn.password.encode() not in dump(p.events())


def test_a_call_under_cover_does_not_wait_for_slots(make: Callable[..., Peer]) -> None:
    """With cover on and slots an hour apart, call signaling still leaves at once (it is
    outside the slots, docs/protocol.md §24): the call connects and hangs up as without."""
    alice, bob = make("alice", test_methods=True), make("bob", test_methods=True)
    connect(alice, bob)
    for p in (alice, bob):
        p.call("privacy.set", {"level": "default", "interval": 3600})
    call_id = alice.call("calls.start", {"contact": "bob"})["call_id"]
    event(bob, "call.incoming", call_id=call_id)
    bob.call("calls.accept", {"call_id": call_id})
    event(alice, "call.state", call_id=call_id, state="active")
    event(bob, "call.state", call_id=call_id, state="active")
    alice.call("calls.hangup", {"call_id": call_id})
    event(bob, "call.state", call_id=call_id, state="ended", reason="remote_hangup")
    # A text in the meantime waits for its slot: the two schedules are apart.
    alice.call("messages.send", {"contact": "bob", "text": "after the call"})
    time.sleep(1.0)
    assert {m["status"] for m in alice.call("messages.history", {"contact": "bob"})["messages"]
            if m["text"] == "after the call"} == {"queued"}  # fmt: skip


def test_ringing_waits_like_a_receipt_and_is_not_sent_for_a_call_declined_first(
    make: Callable[..., Peer], proxy: RecordingProxy
) -> None:
    """The callee's daemon does not answer an INVITE's deposit at once (the relay would link the
    two mailboxes, and any contact could tell the callee is online): RINGING leaves after a
    receipt's random delay, and never if the call is declined (or cancelled) before it."""
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    # A receipt's delay of up to an hour: the RINGING is still waiting when bob declines.
    bob.call("settings.set", {"receipt_delay_max": 3600})
    call_id = alice.call("calls.start", {"contact": "bob"})["call_id"]
    event(bob, "call.incoming", call_id=call_id)
    bob.call("calls.reject", {"call_id": call_id})
    event(alice, "call.state", call_id=call_id, state="ended", reason="rejected")
    # A message from bob after the REJECT: anything bob's daemon sent before it has arrived.
    bob.call("messages.send", {"contact": "alice", "text": "declined"})
    event(alice, "message.received", text="declined")
    states = [e["data"]["state"] for e in alice.events(types=["call.state"])
              if e["data"]["call_id"] == call_id]  # fmt: skip
    assert states == ["calling", "ended"], states
    assert bob.call("calls.history", {"limit": 1})["calls"][0]["reason"] == "rejected"


def test_caller_sees_calling_once_then_ringing_and_how_long_it_lasted(
    make: Callable[..., Peer],
) -> None:
    """`aegis call` prints each state once, "ringing" when the callee's daemon rings; the
    history shows when each call was and how long it lasted; call-settings speaks words."""
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    follow = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "call", "bob", "--home", str(alice.home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert follow.stdout is not None
        lines.extend(iter(follow.stdout.readline, ""))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        alice.wait_for(lambda: any(": ringing" in x for x in lines), "ringing", timeout=T_CALL)
        cli(bob, "answer")
        alice.wait_for(lambda: any(": active" in x for x in lines), "active", timeout=T_CALL)
        cli(bob, "hangup")
        err = follow.stderr.read() if follow.stderr else ""
        assert follow.wait(T_CALL) == 0, "".join(lines) + err
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    reader.join(10)
    states = [x.split(": ", 1)[1].split()[0] for x in lines if x.startswith("call to bob: ")]
    assert states == ["calling", "ringing", "connecting", "active", "ended"], lines
    ended = next(x for x in lines if ": ended" in x).strip()
    assert re.search(r": ended \(remote_hangup\), \d+:\d\d  \[[0-9a-f]{32}\]$", ended), ended
    for p in (alice, bob):
        r = subprocess.run(
            [sys.executable, "-m", "aegis_cli.main", "calls", "--home", str(p.home)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert re.match(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d  call (to bob|from alice): ended "
            r"\((remote_)?hangup\), \d+:\d\d  \[[0-9a-f]{32}\]$", r.stdout.strip()
        ), r.stdout
        info = p.call("calls.history", {"limit": 1})["calls"][0]
        assert info["ended_at"] >= info["answered_at"] >= info["created_at"]
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "call-settings", "--home", str(alice.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not re.search(r"\b(True|False|None)\b", r.stdout), r.stdout
    for line in ("ring timeout (seconds): 45", "hide my IP: off", "TURN server: not set",
                 "microphone: the system's default", "TURN password: not set"):  # fmt: skip
        assert line in r.stdout.splitlines(), r.stdout
