"""A group message's fan-out spread over a window (privacy.group_spread_max, issue 16): with
cover off, each member's copy is queued in the durable outbox with its own random not_before
within the window, and every copy is delivered; with the spread at 0 the copies share one
not_before, as before (send jitter shifts them together)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from aegis_cli.client import RpcCallError
from tests.functional.conftest import Peer, connect
from tests.functional.test_groups import invited, members, outbox_size, texts
from tests.functional.test_hostile_contact import offline_store
from tests.relay.conftest import RelayProcess

T = 60.0
SPREAD = 30.0  # wide enough that at most one copy of three leaves before the outbox is read


def queued_copies(peer: Peer, since_ms: int, contacts: set[int]) -> dict[int, tuple[int, int]]:
    """contact id -> (created_at, not_before) of the blocks queued since `since_ms`."""
    s = offline_store(peer)
    try:
        rows = s._q("SELECT contact_id, created_at, not_before FROM outbox WHERE created_at >= ?",
                    (since_ms,)).fetchall()  # fmt: skip
    finally:
        s.close()
    return {int(r[0]): (int(r[1]), int(r[2])) for r in rows if r[0] in contacts}


def contact_ids(peer: Peer, names: list[str]) -> set[int]:
    s = offline_store(peer)
    try:
        return {c.id for c in s.list_contacts() if c.name in names}
    finally:
        s.close()


def test_a_group_fan_out_is_spread_and_zero_keeps_one_moment(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob, carol, dave = peers("alice"), peers("bob"), peers("carol"), peers("dave")
    others = [bob, carol, dave]
    for p in others:
        connect(p, alice)
    g = alice.call("group.create", {"name": "Spread 5e2b"})["group"]
    for p in others:
        alice.call("group.invite", {"group": g, "contact": p.name})
        p.call("group.accept", {"invitation": invited(p)})
        alice.wait_for(lambda p=p: len(members(alice)) == 2 + others.index(p),
                       f"{p.name}'s add", T)  # fmt: skip
    ids = contact_ids(alice, [p.name for p in others])
    assert len(ids) == 3

    with pytest.raises(RpcCallError) as err:
        alice.call("settings.set", {"group_spread_max": 3601})
    assert err.value.error == "invalid_params"
    got = alice.call("settings.set", {"group_spread_max": SPREAD})
    assert got["group_spread_max"] == SPREAD and got["send_jitter_max"] == 0.0

    # Spread: three copies, three not_before times of their own within [send, send + SPREAD].
    alice.wait_for(lambda: outbox_size(alice) == 0, "alice's outbox to drain", T)
    t0 = int(time.time() * 1000) - 5
    assert alice.call("group.send", {"group": g, "text": "spread out"})["recipients"] == 3
    copies = queued_copies(alice, t0, ids)
    # A copy whose draw was shorter than this read is already gone (about 1 in 100 each).
    assert len(copies) >= 2
    for created, not_before in copies.values():
        assert created <= not_before <= created + SPREAD * 1000
    assert len({nb for _, nb in copies.values()}) == len(copies)
    for p in others:  # every copy arrives, each at its own time
        p.wait_for(lambda p=p: "spread out" in texts(p), f"{p.name} to get it", SPREAD + T)

    # Zero: the old behaviour, one moment for all (a send jitter holds them, so they can be
    # read; it shifts the copies together).
    alice.call("settings.set", {"group_spread_max": 0, "send_jitter_max": 3600})
    alice.wait_for(lambda: outbox_size(alice) == 0, "alice's outbox to drain", T)
    t1 = int(time.time() * 1000) - 5
    alice.call("group.send", {"group": g, "text": "together"})
    copies = queued_copies(alice, t1, ids)
    assert set(copies) == ids
    assert len({nb for _, nb in copies.values()}) == 1
