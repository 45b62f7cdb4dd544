"""Cover for every device of a contact (docs/protocol.md §24, "Several devices"): a real relay,
Alice on two devices (A1, A2, linked), Bob with cover on. Every slot Bob draws for Alice puts
exactly one block into A1's mailbox for him and one into A2's, whether he writes or not: the
relay's own table of stored blocks, counted per mailbox by a trigger, says so."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aegisd.services.mailbox import OwnedMailbox
from aegisd.store import open_profile
from relay.storage import deposit_key
from tests.daemon.conftest import DaemonProc
from tests.functional.test_devices import confirm_both, start_link, texts, wait_state
from tests.relay.conftest import RelayProcess

from .conftest import T_DEVICE, Peer, connect

FAST = 0.3  # Bob's mean seconds between slots while counting
STILL = 3600.0  # Bob's interval between the counts: no slot comes


def _start(p: Peer) -> None:
    p.proc = DaemonProc(p.home, ["--test-methods"], None)
    p.proc.wait_ready()


@pytest.fixture
def make(tmp_short: Path, relay_proc: RelayProcess) -> Iterator[Callable[[str], Peer]]:
    made: list[Peer] = []
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"

    def _make(name: str) -> Peer:
        p = Peer(tmp_short / name, url, name)
        made.append(p)
        p.stop()
        _start(p)
        return p

    try:
        yield _make
    finally:
        for p in made:
            p.stop()


def _relay_db(relay: RelayProcess) -> sqlite3.Connection:
    return sqlite3.connect(relay.data / "relay.sqlite3", timeout=10)


def _count_deposits(relay: RelayProcess) -> None:
    """Every block the relay stores, by mailbox, from now on (kept when the owner fetches it)."""
    with _relay_db(relay) as db:
        db.executescript(
            "CREATE TABLE deposits (mailbox INTEGER);"
            "CREATE TRIGGER deposits_t AFTER INSERT ON messages "
            "BEGIN INSERT INTO deposits (mailbox) VALUES (NEW.mailbox); END;"
        )


def _mark(relay: RelayProcess, mark: int) -> None:
    """A row in the deposits' order that says where a count starts (-1) or ends (-2)."""
    with _relay_db(relay) as db:
        db.execute("INSERT INTO deposits VALUES (?)", (mark,))


def _deposits(relay: RelayProcess, mailbox: int) -> int:
    with _relay_db(relay) as db:
        row = db.execute("SELECT count(*) FROM deposits WHERE mailbox = ?", (mailbox,)).fetchone()
    return int(row[0])


def _mailbox_for(p: Peer, contact: str, relay: RelayProcess) -> int:
    """The relay's row of ``p``'s mailbox for ``contact`` (the daemon stopped)."""
    store = open_profile(p.home, None)
    try:
        c = store.contact_by_name(contact)
        assert c is not None
        row = store.mailbox_for_contact(c.id)
        assert row is not None
        deposit_id = OwnedMailbox.from_bytes(row.descriptor).deposit_id
    finally:
        store.close()
    with _relay_db(relay) as db:
        got = db.execute("SELECT id FROM mailboxes WHERE deposit_key = ?",
                         (deposit_key(deposit_id),)).fetchone()  # fmt: skip
    assert got is not None
    return int(got[0])


def _slots(bob: Peer) -> int:
    return int(bob.call("privacy.get")["slots"]["sent"]["slots"])


def test_every_device_mailbox_gets_one_block_per_slot(
    make: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    a1, bob = make("alice"), make("bob")
    connect(a1, bob)
    # Cover on at Bob from here, slots an hour apart until the counts: everything he sends
    # Alice (the acknowledgement of her list too) waits for a slot, none leaves beside them.
    bob.call("privacy.set", {"level": "default", "interval": STILL})
    a2 = make("alice2")
    start_link(a1, a2)
    confirm_both(a1, a2)
    wait_state(a1, "done")
    wait_state(a2, "done")
    bob.wait_for(lambda: [e for e in bob.events(types=["contact.devices"])
                          if e["data"]["devices"] == 2], "A2's answer", T_DEVICE)  # fmt: skip
    boxes = {}
    for p in (a1, a2):  # the relay's rows of each device's mailbox for Bob
        p.stop()
        boxes[p.name] = _mailbox_for(p, "bob", relay_proc)
        _start(p)
        p.wait_connected()
    assert boxes["alice"] != boxes["alice2"]
    _count_deposits(relay_proc)
    # Alice's devices keep cover off (a relay on loopback): only Bob's slots reach them.

    def counted(during: Callable[[], None]) -> tuple[int, int, int]:
        """Bob's slots for Alice while ``during`` runs, and the blocks each of Alice's
        mailboxes for him received meanwhile: waited for until both match the slots (a
        deposit follows its slot by the outbox's drain)."""
        # A block from Alice, so that Bob does not take her for away during the count.
        a1.call("messages.send", {"contact": "bob", "text": "here"})
        bob.wait_for(lambda: ("in", "here") in texts(bob, "alice")[-1:], "Alice's text")
        before = (_slots(bob), _deposits(relay_proc, boxes["alice"]),
                  _deposits(relay_proc, boxes["alice2"]))  # fmt: skip
        _mark(relay_proc, -1)
        bob.call("privacy.set", {"interval": FAST})
        during()
        bob.call("privacy.set", {"interval": STILL})
        _mark(relay_proc, -2)
        last: list[tuple[int, int, int]] = []

        def settled() -> tuple[int, int, int] | None:
            # Read again: a slot that began before the change may end after it.
            slots = _slots(bob) - before[0]
            got = (slots, _deposits(relay_proc, boxes["alice"]) - before[1],
                   _deposits(relay_proc, boxes["alice2"]) - before[2])  # fmt: skip
            last.append(got)
            return got if got[1] == got[2] == slots else None

        try:
            out: tuple[int, int, int] = bob.wait_for(settled, "one block per slot per device", 30)
        except AssertionError as exc:
            with _relay_db(relay_proc) as db:
                rows = db.execute("SELECT mailbox FROM deposits").fetchall()
            # The deposits in order: A1's mailbox a, A2's b, others ., the count between [ ].
            names = {boxes["alice"]: "a", boxes["alice2"]: "b", -1: "[", -2: "]"}
            seq = "".join(names.get(r[0], ".") for r in rows)
            raise AssertionError(f"(slots, A1, A2) {last[-1]}: {seq}") from exc
        return out

    started = time.monotonic()
    quiet = counted(lambda: time.sleep(4.0))
    quiet_s = time.monotonic() - started

    def write() -> None:
        for i in range(3):
            bob.call("messages.send", {"contact": "alice", "text": f"slot {i}"})
        for d in (a1, a2):  # each copy took a slot of its device's mailbox, not one beside it
            d.wait_for(lambda d=d: {("in", f"slot {i}") for i in range(3)} <= set(texts(d, "bob")),
                       "Bob's texts on both devices")  # fmt: skip

    talking = counted(write)
    assert quiet[0] > 0 and talking[0] >= 3, (quiet, talking)
    sent = bob.call("privacy.get")["slots"]["sent"]
    assert sent["real"] >= 3 and sent["cover"] > 0, sent
    # The figure (docs/threat-model.md §4.10): blocks per hour into each device's mailbox at
    # this run's interval, the same for both devices, with or without messages.
    per_hour = quiet[1] * 3600 / quiet_s
    print(f"slots {quiet[0]} in {quiet_s:.1f} s (mean interval {FAST} s): A1 {quiet[1]}, "
          f"A2 {quiet[2]} blocks, {per_hour:.0f} per hour per device; writing: slots "
          f"{talking[0]}, A1 {talking[1]}, A2 {talking[2]}")
