"""How a device link's run ends in the daemon (aegisd/services/device_link.py, device_offer.py,
device_join.py), at the edges a real relay cannot time: a block fetched in the last second
before a deadline, a relay request's own timeout. The core's state machines are real
(tests/unit/test_core_devices.py's Link); the relay is replaced by the blocks each step would
fetch. Whatever happens, the state ends (docs/devices.md §4.5): never `installing` or
`listing` for good, which would answer every later link `busy`."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.services import device_join, device_offer, devices
from aegisd.services import device_link as sd
from tests.unit.test_core_devices import END, FIRST, IDENTITY, NOW, Link, device


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _devices() -> Any:
    """A DeviceLinks whose relay, store and daemon steps are the tests' (set as attributes)."""
    events = types.SimpleNamespace(emit=lambda *a: None, emit_live=lambda *a: None)
    m: Any = types.SimpleNamespace(_spawn=lambda c: c.close(), store=None,
                                   ctx=types.SimpleNamespace(events=events))  # fmt: skip
    dev: Any = devices.Devices(m).links

    async def nothing(*a: Any) -> None:
        return None

    dev._end = nothing
    dev._publish = nothing
    dev._reconfigure = nothing
    return dev


def test_a_listed_block_in_the_last_second_ends_the_link_done_unconfirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listing wait's deadline is whole seconds: a block fetched in its last second makes
    the core's receive_listed raise LinkExpired. Before the fix it escaped the run, which left
    the link `listing` for good (link and join `busy`, cancel `installing`)."""
    link = Link()
    link.request()
    clock = Clock(NOW + 20)
    monkeypatch.setattr(device_join, "_now", clock)
    dev = _devices()
    run = sd._Link("join", END, grace=dv.FINAL_GRACE)
    dev.link = run

    async def steps(*a: Any) -> tuple[Any, Any, Any]:
        return None, types.SimpleNamespace(devices=()), None

    async def install(*a: Any) -> int:
        return 0

    async def said(*a: Any) -> bool:
        return True

    async def blocks(*a: Any) -> list[bytes]:
        clock.now = END + 2 * dv.FINAL_GRACE  # the wait's own timer has not fired yet
        await asyncio.sleep(0.01)
        return [bytes(wire.BLOCK_SIZE)]

    dev._join_steps, dev._install, dev._say_installed = steps, install, said
    dev._blocks = blocks

    async def main() -> None:
        run.task = asyncio.ensure_future(dev._run_join(run, link.join, None, None))
        await asyncio.wait_for(run.task, 30)

    asyncio.run(main())
    assert run.state == "done" and run.reason == sd.UNCONFIRMED
    assert dev._pending() is None


def _at_the_final(monkeypatch: pytest.MonkeyPatch, late: int) -> tuple[sd._Link, Any]:
    """N's run from its user's yes to E's final, the final fetched at `late`."""
    link = Link()
    link.received()
    clock = Clock(NOW + 8)
    monkeypatch.setattr(device_join, "_now", clock)
    dev = _devices()
    run = sd._Link("join", END, grace=dv.FINAL_GRACE)
    run.confirmed.set()
    dev.link = run
    sent: list[bytes] = []

    async def deposit(_to: bytes, block: bytes, _token: bytes) -> None:
        sent.append(block)

    async def blocks(*a: Any) -> list[bytes]:
        if not sent:
            return []
        _, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, sent[0], NOW + 10)
        clock.now = late
        return [final]

    made = types.SimpleNamespace(to_bytes=lambda: b"made", address=lambda: device(9).mailbox,
                                 deposit_id=device(9).bundle_address)  # fmt: skip

    async def new_mailbox(**kw: Any) -> Any:
        return made

    dev.m.mailboxes = types.SimpleNamespace(new_mailbox=new_mailbox)
    dev.m.entropy = link.n_rng
    dev._remember_link_mailbox = lambda d: None
    dev._blocks = blocks
    dev._drop_made = lambda made: asyncio.sleep(0)
    dev.devices._entry_for = lambda mb: device(9)
    client: Any = types.SimpleNamespace(deposit=deposit)

    async def main() -> None:
        run.task = asyncio.ensure_future(dev._run_join(run, link.join, client, None))
        await asyncio.wait_for(run.task, 30)

    asyncio.run(main())
    return run, dev


def test_a_final_fetched_past_its_grace_is_said_expired_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """E's final fetched in the last second of N's wait (the core's LinkExpired): the link
    expired; before the fix N said "the existing device refused this device"."""
    run, _ = _at_the_final(monkeypatch, END + dv.FINAL_GRACE)
    assert run.state == "expired" and "refused" not in (run.reason or "")


def test_a_relay_timeout_is_not_said_as_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay request's own timeout (relay/client.py request_timeout) inside E's steps: the
    link failed because the relay was slow, not expired (before the fix: `expired`)."""
    monkeypatch.setattr(device_offer, "_now", Clock(NOW + 2))
    dev = _devices()
    run = sd._Link("offer", END)
    dev.link = run

    async def steps(*a: Any) -> None:
        raise TimeoutError

    dev._offer_steps = steps

    async def main() -> None:
        await dev._run_offer(run, Link().offer, None, None)

    asyncio.run(main())
    assert run.state == "failed" and run.reason == sd.RELAY_SLOW
