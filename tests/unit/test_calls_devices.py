"""Calls with a contact who has several devices (docs/devices.md §9, docs/protocol.md §21.5):
the caller takes the first ACCEPT of a device it invited and tells the others "answered
elsewhere"; it ends rejected (busy) only once every invited device declined (was busy); what
comes for a call from a device it was not sent to, or not the one that took it, is dropped.

The state machine runs against the stand-in messenger of test_calls_ringing (it records each
payload and the sessions it was sent in); the real daemons are in
tests/functional/test_calls_devices.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from aegisd.calls.service import INVITED, Call, CallService
from aegisd.calls.signaling import CallChannel, new_call_key
from aegisd.core import wire
from aegisd.services.delivery import ROW_DEVICE

from .test_calls_ringing import ALICE, E, FakeMessenger, invite, settle

A2 = b"\xa2" * 16
OTHER = b"\xee" * 16  # a device of Alice's the call was not sent to (removed, hostile)
CID = b"\x42" * 16


def service() -> tuple[CallService, FakeMessenger, list[dict[str, Any]]]:
    m = FakeMessenger(3600.0)
    events: list[dict[str, Any]] = []
    ctx = SimpleNamespace(store=m.store,
                          events=SimpleNamespace(emit=lambda kind, data: events.append(data)))
    s = CallService(ctx, m)  # type: ignore[arg-type]

    async def no_media(call: Call) -> None:  # the media (aiortc) is not under test here
        return None

    s._send_offer = no_media  # type: ignore[method-assign]
    return s, m, events


def outgoing(s: CallService) -> Call:
    """A call to Alice whose INVITE went in her row's session and A2's."""
    secret, public = new_call_key(E)
    call = Call(CID, ALICE.id, ALICE.name, "out", False, "calling", 0, secret=secret,
                public=public, invited={ROW_DEVICE: INVITED, A2: INVITED})  # fmt: skip
    s.calls[CID] = call
    return call


def setup(kind: int, reason: int = 0) -> wire.CallPayload:
    key = new_call_key(E)[1] if kind == wire.CALL_ACCEPT else b""
    return wire.CallPayload(CID, kind, key=key, reason=reason)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_first_accept_wins_the_others_hear_answered_elsewhere() -> None:
    async def main() -> None:
        s, m, _ = service()
        call = outgoing(s)
        s.on_payload(ALICE, setup(wire.CALL_RINGING))  # type: ignore[arg-type]
        s.on_payload(ALICE, setup(wire.CALL_ACCEPT), OTHER)  # type: ignore[arg-type]
        assert call.state == "ringing" and call.device is None  # not a device it invited
        s.on_payload(ALICE, setup(wire.CALL_ACCEPT), A2)  # type: ignore[arg-type]
        assert call.state == "connecting" and call.device == A2
        await settle()
        assert [(p.kind, p.reason) for p in m.sent] == [
            (wire.CALL_CANCEL, wire.CALL_REASON_ANSWERED_ELSEWHERE)
        ]
        assert m.to == [[ROW_DEVICE]]
        # The row's device answers too (crossed with the CANCEL), or declines: dropped.
        channel = call.channel
        s.on_payload(ALICE, setup(wire.CALL_ACCEPT))  # type: ignore[arg-type]
        s.on_payload(ALICE, setup(wire.CALL_REJECT, wire.CALL_REASON_REJECTED))  # type: ignore[arg-type]
        assert call.state == "connecting" and call.channel is channel
        # A sealed HANGUP in the row's session is dropped unopened (whatever key sealed it).
        a2 = CallChannel(CID, new_call_key(E)[0], call.public, caller=False)
        s.on_payload(ALICE, a2.seal(E, 4, b""))  # type: ignore[arg-type]
        assert call.state == "connecting"
        await s.hangup(CID.hex())
        assert m.to[-1] == [A2]  # everything after the ACCEPT goes in A2's session only

    run(main)


def test_rejected_only_when_every_device_declined_busy_only_when_all_busy() -> None:
    async def main() -> None:
        s, m, events = service()
        call = outgoing(s)
        s.on_payload(ALICE, setup(wire.CALL_REJECT, wire.CALL_REASON_REJECTED))  # type: ignore[arg-type]
        s.on_payload(ALICE, setup(wire.CALL_REJECT, wire.CALL_REASON_REJECTED), OTHER)  # type: ignore[arg-type]
        await settle()
        assert call.state == "calling"  # A2 still rings
        s.on_payload(ALICE, setup(wire.CALL_REJECT, wire.CALL_REASON_BUSY), A2)  # type: ignore[arg-type]
        await settle()
        assert call.state == "ended" and events[-1]["reason"] == "rejected"
        assert m.sent == []  # nothing to tell anyone

        s, m, events = service()
        call = outgoing(s)
        for device in (ROW_DEVICE, A2):
            s.on_payload(ALICE, setup(wire.CALL_REJECT, wire.CALL_REASON_BUSY), device)  # type: ignore[arg-type]
        await settle()
        assert call.state == "ended" and events[-1]["reason"] == "busy"

        # Unanswered (the caller hangs up): CANCEL to each device still ringing only.
        s, m, events = service()
        call = outgoing(s)
        s.on_payload(ALICE, setup(wire.CALL_REJECT, wire.CALL_REASON_REJECTED), A2)  # type: ignore[arg-type]
        await s.hangup(CID.hex())
        assert [p.kind for p in m.sent] == [wire.CALL_CANCEL] and m.to == [[ROW_DEVICE]]

    run(main)


def test_callee_device_answers_in_its_session_and_stops_on_answered_elsewhere() -> None:
    async def main() -> None:
        s, m, events = service()
        s.on_payload(ALICE, invite(CID), A2)  # type: ignore[arg-type]
        assert s.calls[CID].device == A2
        # A CANCEL from another of the caller's devices does not stop it.
        s.on_payload(ALICE, setup(wire.CALL_CANCEL, wire.CALL_REASON_ANSWERED_ELSEWHERE))  # type: ignore[arg-type]
        await settle()
        assert s.calls[CID].state == "ringing"
        s.on_payload(ALICE, setup(wire.CALL_CANCEL, wire.CALL_REASON_ANSWERED_ELSEWHERE), A2)  # type: ignore[arg-type]
        await settle()
        assert CID not in s.calls and events[-1]["reason"] == "answered_elsewhere"
        assert m.sent == []

        s, m, events = service()
        s.on_payload(ALICE, invite(CID), A2)  # type: ignore[arg-type]
        await s.reject(CID.hex())
        assert [p.kind for p in m.sent] == [wire.CALL_REJECT] and m.to == [[A2]]

    run(main)
