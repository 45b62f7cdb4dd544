"""Group invitations and answers may span up to 11 blocks (docs/protocol.md §25.8); nothing
else may be longer than 5, and a contact keeps at most 2 such long partial messages (real
daemons, a real relay, blocks made with the contact's real keys: tests/support/hostile.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.services.groups_state import SETTING_MAX_INVITATIONS
from aegisd.services.inbox import LONG_PARTIALS_PER_CONTACT, MAX_GROUP_FRAGMENTS
from tests.functional.conftest import Peer, connect
from tests.functional.test_hostile_contact import (
    fragments_kept,
    received,
    set_offline,
    text,
    url_of,
)
from tests.relay.conftest import RelayProcess
from tests.support.hostile import Hostile, hostile


def split(h: Hostile, payload: wire.Payload, count: int) -> list[bytes]:
    """A whole payload sent as `count` fragments (the sender's software never splits so thin,
    but a receiver must take it)."""
    data = wire.encode_payload(payload)
    size = -(-len(data) // count)
    msg_id = os.urandom(wire.MSG_ID_LEN)
    return [h.fragment_block(msg_id, i, count, data[i * size : (i + 1) * size])
            for i in range(count)]  # fmt: skip


def test_long_group_payloads_pass_and_other_long_messages_do_not(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    with hostile(alice.home, "bob") as h:
        state = h.store.get_identity()
        assert state is not None
        me = PrekeyStore.from_bytes(state).identity
        group = core.create_group(SystemEntropy(), me, "Long one")
        invite = wire.GroupInvitePayload(os.urandom(16), int(time.time() * 1000),
                                         core.sign_state(me, group), ())  # fmt: skip
        blocks = split(h, invite, MAX_GROUP_FRAGMENTS)  # a group invitation: taken
        blocks += split(h, text("a long text"), 7)  # a text over 5 blocks: dropped whole
        blocks += [h.fragment_block(os.urandom(wire.MSG_ID_LEN), 0, MAX_GROUP_FRAGMENTS + 1,
                                    b"x" * 50)]  # over 11: dropped  # fmt: skip
        blocks += [h.fragment_block(os.urandom(wire.MSG_ID_LEN), 0, 9, b"y" * 50)
                   for _ in range(3 * LONG_PARTIALS_PER_CONTACT)]  # fmt: skip
        blocks += h.payload_blocks(text("after the long ones"))
        h.deposit(url_of(relay_proc), blocks)
    bob.wait_for(lambda: received(bob, "alice", "after the long ones"), "the text after them")
    invitations = bob.call("group.invitations")["invitations"]
    assert [(i["name"], i["from"]) for i in invitations] == [("Long one", "alice")]
    assert not received(bob, "alice", "a long text")
    assert fragments_kept(bob) == LONG_PARTIALS_PER_CONTACT  # one fragment of each kept


def test_waiting_group_invitations_are_capped(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Invitations cost the invitee a check and a row each: past the cap, new ones are
    dropped until the user answers some; refused ones (a forged base) leave nothing."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    set_offline(bob, SETTING_MAX_INVITATIONS, 2)
    alice.stop()
    with hostile(alice.home, "bob") as h:
        state = h.store.get_identity()
        assert state is not None
        me = PrekeyStore.from_bytes(state).identity
        blocks = []
        for n in range(4):
            group = core.create_group(SystemEntropy(), me, f"Group {n}")
            base = core.sign_state(me, group)
            if n == 0:  # a forged base: refused, and kept nowhere
                base = replace(base, sig=bytes(64))
            blocks += h.payload_blocks(wire.GroupInvitePayload(
                os.urandom(16), int(time.time() * 1000), base, ()))  # fmt: skip
        blocks += h.payload_blocks(text("after the invitations"))
        h.deposit(url_of(relay_proc), blocks)
    bob.wait_for(lambda: received(bob, "alice", "after the invitations"), "the text after them")
    names = [i["name"] for i in bob.call("group.invitations")["invitations"]]
    assert names == ["Group 1", "Group 2"]
