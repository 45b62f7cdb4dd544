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
from aegisd.store.contact_devices import ROW_DEVICE

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


def outgoing(s: CallService, devices: tuple[bytes, ...] = (ROW_DEVICE, A2)) -> Call:
    """A call to Alice whose INVITE went in her row's session and A2's."""
    secret, public = new_call_key(E)
    call = Call(CID, ALICE.id, ALICE.name, "out", False, "calling", 0, secret=secret,
                public=public, invited=dict.fromkeys(devices, INVITED))  # fmt: skip
    s.calls[CID] = call
    return call


def setup(kind: int, reason: int = 0) -> wire.CallPayload:
    key = new_call_key(E)[1] if kind == wire.CALL_ACCEPT else b""
    return wire.CallPayload(CID, kind, key=key, reason=reason)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_first_accept_wins_the_others_hear_answered_elsewhere() -> None:
    async def main() -> None:
        s, m, events = service()
        call = outgoing(s)
        s.on_payload(ALICE, setup(wire.CALL_RINGING), OTHER)  # type: ignore[arg-type]
        assert call.state == "calling"  # not a device it invited: it does not ring
        s.on_payload(ALICE, setup(wire.CALL_RINGING))  # type: ignore[arg-type]
        s.on_payload(ALICE, setup(wire.CALL_ACCEPT), OTHER)  # type: ignore[arg-type]
        assert call.state == "ringing" and call.device is None  # not a device it invited
        secret, public = new_call_key(E)  # A2's per-call key
        s.on_payload(ALICE, wire.CallPayload(CID, wire.CALL_ACCEPT, key=public), A2)  # type: ignore[arg-type]
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
        # A HANGUP sealed with A2's own call key, but in the row's session: dropped (the row's
        # device did not take the call); the same HANGUP in A2's session ends it.
        hangup = CallChannel(CID, secret, call.public, caller=False).seal(E, 4, b"")
        s.on_payload(ALICE, hangup)  # type: ignore[arg-type]
        await settle()
        assert call.state == "connecting"
        s.on_payload(ALICE, hangup, A2)  # type: ignore[arg-type]
        await settle()
        assert call.state == "ended" and events[-1]["reason"] == "remote_hangup"

        # Everything of ours after the ACCEPT goes in A2's session only.
        s, m, _ = service()
        call = outgoing(s)
        s.on_payload(ALICE, setup(wire.CALL_ACCEPT), A2)  # type: ignore[arg-type]
        await s.hangup(CID.hex())
        assert m.to[-1] == [A2]

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


def test_an_accept_with_a_bad_key_counts_as_declined_the_others_ring_on() -> None:
    async def main() -> None:
        s, m, events = service()
        call = outgoing(s)
        bad = wire.CallPayload(CID, wire.CALL_ACCEPT, key=bytes(32))  # a low-order key
        s.on_payload(ALICE, bad, A2)  # type: ignore[arg-type]
        await settle()
        # A2 alone is told to stop (a plain CANCEL); nobody hears "answered elsewhere".
        assert call.state == "calling" and call.device is None
        assert [(p.kind, p.reason) for p in m.sent] == [(wire.CALL_CANCEL, 0)] and m.to == [[A2]]
        s.on_payload(ALICE, setup(wire.CALL_ACCEPT))  # type: ignore[arg-type]  the row answers
        await settle()
        assert call.state == "connecting" and call.device == ROW_DEVICE
        assert len(m.sent) == 1  # A2 is out already: no CANCEL to it

        # The row declines, A2's ACCEPT is bad: rejected. One device, a bad key: failed.
        s, m, events = service()
        call = outgoing(s)
        s.on_payload(ALICE, setup(wire.CALL_REJECT, wire.CALL_REASON_REJECTED))  # type: ignore[arg-type]
        s.on_payload(ALICE, bad, A2)  # type: ignore[arg-type]
        await settle()
        assert call.state == "ended" and events[-1]["reason"] == "rejected"
        s, m, events = service()
        call = outgoing(s, (ROW_DEVICE,))
        s.on_payload(ALICE, bad)  # type: ignore[arg-type]
        await settle()
        assert call.state == "ended" and events[-1]["reason"] == "failed"
        assert [p.kind for p in m.sent] == [wire.CALL_CANCEL] and m.to == [[ROW_DEVICE]]

    run(main)


class Locked(FakeMessenger):
    """Sends under a lock, as Messenger.send_call_payload does under the messenger's; None
    goes in the row's session and A2's."""

    def __init__(self) -> None:
        super().__init__(3600.0)
        self.lock = asyncio.Lock()
        self.contacts = SimpleNamespace(by_name=lambda name: ALICE_CONTACT)

    async def send_call_payload(
        self, contact_id: int, payload: Any, to: list[bytes] | None = None
    ) -> list[bytes]:
        async with self.lock:
            self.sent.append(payload)
            self.to.append(to)
            return [ROW_DEVICE, A2] if to is None else list(to)


ALICE_CONTACT = SimpleNamespace(id=ALICE.id, name=ALICE.name, blocked=False)


def test_crossed_while_its_invite_waits_for_the_lock_cancels_it_on_every_device() -> None:
    """Our INVITE waits for the messenger's lock, which the inbox holds while it hands us A1's
    crossing INVITE (lower id: ours loses). The devices ours goes to are not known yet; the
    CANCEL follows the INVITE into every session (A2 would ring for a dead call otherwise)."""

    async def main() -> None:
        m = Locked()
        ctx = SimpleNamespace(store=m.store, events=SimpleNamespace(emit=lambda *a: None))
        s = CallService(ctx, m)  # type: ignore[arg-type]

        async def no_media(*a: Any) -> None:
            return None

        s._check_media = no_media  # type: ignore[method-assign]
        s._check_address_consent = lambda *a: None  # type: ignore[method-assign]
        await m.lock.acquire()  # the inbox holds it
        task = asyncio.create_task(s.start("alice", False, None, None))
        await settle()
        ours = next(iter(s.calls.values()))
        assert m.sent == [] and ours.invited == {}  # the INVITE waits
        crossing = bytes(16)
        assert crossing < ours.id
        s.on_payload(ALICE_CONTACT, invite(crossing))  # type: ignore[arg-type]  from A1 (row)
        assert ours.state == "ended"
        m.lock.release()
        assert (await task)["state"] == "ended"
        await settle()
        assert [(p.call_id, p.kind) for p in m.sent] == [
            (ours.id, wire.CALL_INVITE), (ours.id, wire.CALL_CANCEL)
        ]
        assert m.to == [None, None]  # the CANCEL goes everywhere the INVITE went, after it
        assert s.calls[crossing].state == "ringing"  # A1's call rings here

    run(main)
