"""The callee's automatic answers to an INVITE (docs/protocol.md §21.1, docs/threat-model.md §6):
RINGING (and the busy REJECT) leave after a receipt's random delay, not at once, and a RINGING
still waiting is never sent once the call is answered, declined or cancelled.

The CallService runs here against a stand-in messenger that records what it is asked to send,
with the delay it draws replaced by one the test chooses (no clocks are measured)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from aegisd.calls.service import CallService
from aegisd.core import wire
from aegisd.core.primitives import SystemEntropy
from aegisd.store.contact_devices import ROW_DEVICE

E = SystemEntropy()


class FakeStore:
    def _q(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return SimpleNamespace(fetchone=lambda: None, fetchall=lambda: [])

    def get_setting(self, key: str, default: Any = None) -> Any:
        return default

    def transaction(self) -> Any:
        return contextlib.nullcontext()

    def pending_blocks(self, now: int, limit: int) -> list[Any]:
        return []


class FakeMessenger:
    def __init__(self, delay: float) -> None:
        self.store = FakeStore()
        self.entropy = E
        self.delay = delay
        self.sent: list[wire.CallPayload] = []
        self.to: list[list[bytes] | None] = []  # each send's sessions (None: every device)
        self.delivery = SimpleNamespace(receipt_delay=lambda: self.delay)

    async def send_call_payload(
        self, contact_id: int, payload: Any, to: list[bytes] | None = None
    ) -> list[bytes]:
        self.sent.append(payload)
        self.to.append(to)
        return [ROW_DEVICE] if to is None else list(to)


def service(delay: float) -> tuple[CallService, FakeMessenger]:
    m = FakeMessenger(delay)
    daemon = SimpleNamespace(store=m.store, events=SimpleNamespace(emit=lambda *a: None))
    return CallService(daemon, m), m  # type: ignore[arg-type]


ALICE = SimpleNamespace(id=1, name="alice")
CAROL = SimpleNamespace(id=2, name="carol")


def invite(call_id: bytes) -> wire.CallPayload:
    return wire.CallPayload(call_id, wire.CALL_INVITE, key=bytes(range(1, 33)),
                            sent_at_ms=time.time_ns() // 1_000_000)  # fmt: skip


def kinds(m: FakeMessenger) -> list[int]:
    return [p.kind for p in m.sent]


async def settle() -> None:
    """Let every task that is due run (a RINGING whose delay is long stays waiting)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_ringing_is_sent_after_the_delay_not_at_once() -> None:
    async def main() -> None:
        s, m = service(delay=3600.0)
        s.on_payload(ALICE, invite(b"\x01" * 16))  # type: ignore[arg-type]
        await settle()
        assert m.sent == []  # waiting for its delay
        m2_s, m2 = service(delay=0.01)
        m2_s.on_payload(ALICE, invite(b"\x02" * 16))  # type: ignore[arg-type]
        await until(lambda: kinds(m2) == [wire.CALL_RINGING])
        assert m.sent == []
        await s.on_lock(m.store)  # ends the calls (and cancels what waits)
        await m2_s.on_lock(m2.store)

    run(main)


def test_no_ringing_for_a_call_cancelled_or_declined_before_the_delay() -> None:
    async def main() -> None:
        s, m = service(delay=0.05)
        cid = b"\x03" * 16
        s.on_payload(ALICE, invite(cid))  # type: ignore[arg-type]
        s.on_payload(ALICE, wire.CallPayload(cid, wire.CALL_CANCEL))  # type: ignore[arg-type]
        await settle()
        assert s.calls == {}
        await asyncio.sleep(0.2)  # past the delay: the RINGING would have left by now
        assert m.sent == []

        cid = b"\x04" * 16
        s.on_payload(ALICE, invite(cid))  # type: ignore[arg-type]
        await s.reject(cid.hex())
        await asyncio.sleep(0.2)
        assert kinds(m) == [wire.CALL_REJECT]

    run(main)


def test_busy_answer_waits_too() -> None:
    async def main() -> None:
        s, m = service(delay=3600.0)
        s.on_payload(ALICE, invite(b"\x05" * 16))  # type: ignore[arg-type]
        s.on_payload(CAROL, invite(b"\x06" * 16))  # type: ignore[arg-type]
        await settle()
        assert m.sent == []  # neither the RINGING nor the busy REJECT left at once
        m.delay = 0.01
        s.on_payload(CAROL, invite(b"\x07" * 16))  # type: ignore[arg-type]
        await until(lambda: kinds(m) == [wire.CALL_REJECT])
        assert m.sent[0].reason == wire.CALL_REASON_BUSY
        await s.on_lock(m.store)

    run(main)
