"""Calls with a person on two devices (docs/devices.md §9, docs/protocol.md §21.5): a real
relay and three real daemons on loopback (Alice on A1 and A2, linked with devices.link, and
Bob), media peer to peer on 127.0.0.1 (calls.host_candidates = "loopback", as in
test_calls.py), files in place of a microphone and a speaker.

Bob's call rings on both of Alice's devices; the one that answers takes it and the other stops
ringing "answered elsewhere"; one device declining does not end the call while the other rings;
both declining ends it rejected at Bob; A2 calls Bob as Alice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_devices import texts
from tests.functional.test_devices_fanout import _link, _wait_two_devices

from .calls_support import analyse, write_tone

T_CALL = 45.0


def event(p: Peer, type_: str, since: int = 0, **match: Any) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for ev in p.events(since, types=[type_]):
            if all(ev["data"].get(k) == v for k, v in match.items()):
                return dict(ev["data"])
        return None

    found: dict[str, Any] = p.wait_for(find, f"{type_} {match}", timeout=T_CALL)
    return found


def history(p: Peer, call_id: str) -> dict[str, Any]:
    calls = p.call("calls.history", {"limit": 50})["calls"]
    return next(c for c in calls if c["call_id"] == call_id)


def both_ring(a1: Peer, a2: Peer, call_id: str) -> None:
    for p in (a1, a2):
        assert event(p, "call.incoming", call_id=call_id) == {
            "call_id": call_id, "contact": "bob", "video": False
        }


def test_a_call_rings_on_every_device_the_first_answer_takes_it(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a2 = peers("alice2")
    _link(a1, a2)
    a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"], "bob's session",
                T_DEVICE)  # fmt: skip
    _wait_two_devices(bob)
    for p in (a1, a2, bob):
        p.call("calls.configure", {"host_candidates": "loopback"})
    tone = tmp_short / "tone.wav"
    write_tone(tone, 440.0, 3.0)

    def media(p: Peer, name: str) -> dict[str, str]:
        return {"play": str(tone), "record": str(tmp_short / f"{p.name}-{name}.wav")}

    # 1. Both devices ring; A2 answers: A1 stops "answered elsewhere", Bob and A2 connect.
    call_id = bob.call("calls.start", {"contact": "alice", **media(bob, "1")})["call_id"]
    both_ring(a1, a2, call_id)
    assert a2.call("calls.accept", {"call_id": call_id, **media(a2, "1")})["state"] == "connecting"
    event(a1, "call.state", call_id=call_id, state="ended", reason="answered_elsewhere")
    assert a1.call("calls.list")["calls"] == []
    event(bob, "call.state", call_id=call_id, state="active")
    event(a2, "call.state", call_id=call_id, state="active")
    event(a2, "call.media", call_id=call_id, kind="audio")
    rec = tmp_short / "alice2-1.wav"
    a2.wait_for(lambda: rec.exists() and rec.stat().st_size > 1.5 * 48000 * 4, "the recording")
    bob.call("calls.hangup", {"call_id": call_id})
    event(a2, "call.state", call_id=call_id, state="ended", reason="remote_hangup")
    assert abs(analyse(rec)[1] - 440.0) < 10  # Bob's tone reached A2
    assert history(a1, call_id)["reason"] == "answered_elsewhere"
    assert history(bob, call_id)["answered_at"] is not None

    # 2. Both decline: Bob's call ends rejected (once both did).
    call_id = bob.call("calls.start", {"contact": "alice", **media(bob, "2")})["call_id"]
    both_ring(a1, a2, call_id)
    a1.call("calls.reject", {"call_id": call_id})
    a2.call("calls.reject", {"call_id": call_id})
    event(bob, "call.state", call_id=call_id, state="ended", reason="rejected")
    for p in (a1, a2):
        assert history(p, call_id)["reason"] == "rejected"

    # 3. A1 declines, A2 answers after it: the call goes on (A1's REJECT did not end it).
    call_id = bob.call("calls.start", {"contact": "alice", **media(bob, "3")})["call_id"]
    both_ring(a1, a2, call_id)
    a1.call("calls.reject", {"call_id": call_id})
    # A barrier: A1's text leaves after its REJECT in the same session, so once Bob has the text
    # he has had the REJECT (else A2's ACCEPT could come first and prove nothing).
    a1.call("messages.send", {"contact": "bob", "text": "declined on A1"})
    bob.wait_for(lambda: ("in", "declined on A1") in texts(bob, "alice"), "A1's text", T_CALL)
    live = bob.call("calls.list")["calls"]  # still ringing on A2 (its RINGING may be late)
    assert [c["call_id"] for c in live] == [call_id]
    assert live[0]["state"] in ("calling", "ringing")
    a2.call("calls.accept", {"call_id": call_id, **media(a2, "3")})
    event(bob, "call.state", call_id=call_id, state="active")
    event(a2, "call.state", call_id=call_id, state="active")
    a2.call("calls.hangup", {"call_id": call_id})
    event(bob, "call.state", call_id=call_id, state="ended", reason="remote_hangup")

    # 4. A2 calls Bob as Alice; Bob answers; A1 is not rung for its own device's call.
    call_id = a2.call("calls.start", {"contact": "bob", **media(a2, "4")})["call_id"]
    assert event(bob, "call.incoming", call_id=call_id)["contact"] == "alice"
    bob.call("calls.accept", {"call_id": call_id, **media(bob, "4")})
    event(a2, "call.state", call_id=call_id, state="active")
    event(bob, "call.state", call_id=call_id, state="active")
    bob.call("calls.hangup", {"call_id": call_id})
    event(a2, "call.state", call_id=call_id, state="ended", reason="remote_hangup")
    assert [e for e in a1.events(types=["call.incoming"]) if e["data"]["call_id"] == call_id] == []
