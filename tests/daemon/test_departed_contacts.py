"""The removal of departed group contacts (services/groups_state.py DepartedContacts, §25.9):
which connection counts as read, and what a lock leaves behind. In process, on a real store."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aegisd.services.groups_state import DepartedContacts
from aegisd.services.mailboxes import Mailboxes
from aegisd.services.messenger import Messenger
from aegisd.store import KdfParams, create_profile
from aegisd.store import groups as G
from tests.support.groups import ENTROPY, PEOPLE

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


class Host:
    """What DepartedContacts uses of the messenger (GroupsHost), on a real store."""

    def __init__(self, store: Any) -> None:
        self.ctx = SimpleNamespace(relay_connected=False)
        self.store = store
        self.entropy = ENTROPY
        self.tasks: list[asyncio.Task[None]] = []

    def identity(self) -> Any:
        return PEOPLE[0]

    def spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.create_task(coro))


def connect(pruner: DepartedContacts, host: Host) -> object | None:
    host.ctx.relay_connected = True
    pruner.relay_state(True)
    return pruner.connection()


def test_only_the_current_connection_is_marked_read(tmp_path):
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        host = Host(store)
        pruner = DepartedContacts(host)  # type: ignore[arg-type]
        first = connect(pruner, host)
        pruner.connected(first)
        assert pruner.read_from is not None
        # The link stopped without reporting down (on_lock, restart_link): Messenger and
        # Mailboxes tell the pruner, so the mark goes and the old connection cannot set it.
        messenger = SimpleNamespace(ctx=host.ctx, groups=SimpleNamespace(pruner=pruner))
        mailboxes = Mailboxes(SimpleNamespace(  # type: ignore[arg-type]
            _link_ended=lambda: Messenger._link_ended(messenger)))  # type: ignore[arg-type]
        asyncio.run(mailboxes.stop_link())
        assert pruner.read_from is None and not host.ctx.relay_connected
        pruner.connected(first)  # its after-connect steps finishing late
        assert pruner.read_from is None
        # A new connection: the earlier one's steps do not mark it, its own do.
        second = connect(pruner, host)
        pruner.connected(first)
        assert pruner.read_from is None
        pruner.connected(second)
        assert pruner.read_from is not None
        pruner.relay_state(False)  # lost: reported down
        assert pruner.read_from is None
    finally:
        store.close()


def test_a_task_cancelled_before_its_first_step_does_not_block_the_next(tmp_path):
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        c = store.add_contact("member", identity_key=PEOPLE[1].public.to_bytes())
        G.mark_group_contact(store, c.id)
        G.mark_departed(store, c.id, 0, 2**62)  # far off: the task would wait

        async def scenario() -> None:
            host = Host(store)
            pruner = DepartedContacts(host)  # type: ignore[arg-type]
            pruner._start(c.id)
            pruner._start(c.id)  # at most one per contact
            assert len(host.tasks) == 1
            host.tasks[0].cancel()  # as on_lock does, before the task ran at all
            await asyncio.gather(*host.tasks, return_exceptions=True)
            pruner.on_lock()  # Messenger.on_lock, after cancelling its tasks
            pruner._start(c.id)  # after the unlock: a task again
            assert len(host.tasks) == 2
            host.tasks[1].cancel()
            await asyncio.gather(*host.tasks, return_exceptions=True)

        asyncio.run(scenario())
    finally:
        store.close()


def test_a_departed_admins_change_on_a_state_not_seen_yet_converges(tmp_path):
    """§25.9 through the inbound path (GroupInbound.on_payload, a real store): owner O,
    admins X, Y, member Z (us) at v. O renames on v; X removes Y on v; Y, having O's first,
    renames on v+1. Z gets X's, Y's, then O's: Y's comes while Y is departed here and names a
    parent Z has not seen; it is held, not dropped, and Z ends at the head of every order."""
    from aegisd.core import group as g
    from aegisd.core import wire
    from aegisd.services.groups_inbound import GroupInbound
    from aegisd.services.groups_state import member_rows

    o, x, y, z = PEOPLE[0], PEOPLE[1], PEOPLE[2], PEOPLE[3]
    state = g.create_group(ENTROPY, o, "Start")
    for person, role in ((x, wire.ROLE_ADMIN), (y, wire.ROLE_ADMIN), (z, wire.ROLE_MEMBER)):
        state = g.apply_change(state, g.add_member(o, state, person.public, role))
    o_renames = g.rename(o, state, "Red", "")
    x_removes_y = g.remove_member(x, state, y.public.ed_pub)
    y_renames = g.rename(y, g.apply_change(state, o_renames), "Green", "")
    expected = g.GroupLog(state)
    for change in (o_renames, y_renames, x_removes_y):  # Y's own order
        expected.receive(change)
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        ref = G.add_group(store, state.group_id, g.GroupLog(state).record().to_bytes(),
                          member_rows(state))  # fmt: skip
        host = Host(store)
        host.identity = lambda: z  # type: ignore[method-assign]
        host.ctx.events = SimpleNamespace(emit=lambda *a: None)  # type: ignore[attr-defined]
        host.spawn = lambda coro: coro.close()  # type: ignore[method-assign]
        asked: list[bytes] = []  # one profile with one device: nothing would go
        host.sync_groups = SimpleNamespace(ask=asked.append)  # type: ignore[attr-defined]
        inbound = GroupInbound(host, files=None)  # type: ignore[arg-type]
        contacts = {p: store.add_contact(n, identity_key=p.public.to_bytes())
                    for p, n in ((o, "o"), (x, "x"), (y, "y"))}  # fmt: skip
        for author, change in ((x, x_removes_y), (y, y_renames), (o, o_renames)):
            payload = wire.GroupChangePayload(change)
            inbound.on_payload(contacts[author], None, payload)  # type: ignore[arg-type]
        row = G.get_group(store, ref)
        assert row is not None
        head = g.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log)).head
        assert head == expected.head and head.name == "Green"
        assert head.member(y.public.ed_pub) is not None
    finally:
        store.close()
