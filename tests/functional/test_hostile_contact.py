"""A hostile contact against a user's daemon (issue 15, items 10, 12, 13 and 14): real daemons,
a real relay, and blocks the contact's own software would never send, made with its real keys
(tests/support/hostile.py)."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from aegisd.store.db import Store
from aegisd.store.keyring import Keyring
from relay.storage import deposit_key
from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess
from tests.support.hostile import Hostile, hostile


def url_of(relay: RelayProcess) -> str:
    return f"ws://127.0.0.1:{relay.port}/v1/ws"


def offline_store(peer: Peer) -> Store:
    """The profile's store, opened beside its running daemon (SQLCipher in WAL mode)."""
    key = Keyring.load(peer.home / "keyring.json").unlock(None)
    return Store.open(peer.home / "aegis.db", key)


def fragments_kept(peer: Peer) -> int:
    s = offline_store(peer)
    try:
        return int(s._q("SELECT count(*) FROM fragments").fetchone()[0])
    finally:
        s.close()


def queued(relay: RelayProcess, h: Hostile) -> int:
    """Blocks waiting at the relay in the mailbox the hostile contact writes to."""
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        row = db.execute(
            "SELECT count(*) FROM messages JOIN mailboxes ON messages.mailbox = mailboxes.id "
            "WHERE mailboxes.deposit_key = ?",
            (deposit_key(h.send_to.deposit_id),),
        ).fetchone()
    return int(row[0])


def text(t: str) -> wire.TextPayload:
    return wire.TextPayload(os.urandom(wire.MESSAGE_ID_LEN), time.time_ns() // 1_000_000, t)


def received(peer: Peer, contact: str, t: str) -> bool:
    msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
    return any(m["direction"] == "in" and m["text"] == t for m in msgs)


# --- item 13: partial multi-block messages ------------------------------------------------------


def test_partial_messages_are_capped_per_contact_and_dropped_when_blocked(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    from aegisd.services.inbox import PARTIALS_PER_CONTACT

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    url = url_of(relay_proc)
    with hostile(alice.home, "bob") as h:
        # The first of two fragments of many messages whose second never comes.
        blocks = [
            h.fragment_block(os.urandom(wire.MSG_ID_LEN), 0, 2, b"x" * 100)
            for _ in range(3 * PARTIALS_PER_CONTACT)
        ]
        h.deposit(url, blocks + h.payload_blocks(text("after the partials")))
    bob.wait_for(lambda: received(bob, "alice", "after the partials"), "the text after them")
    assert fragments_kept(bob) == PARTIALS_PER_CONTACT

    # Blocking drops what is kept, and a blocked contact's fragments are not kept.
    bob.call("contacts.block", {"name": "alice"})
    assert fragments_kept(bob) == 0
    with hostile(alice.home, "bob") as h:
        h.deposit(url, [h.fragment_block(os.urandom(wire.MSG_ID_LEN), 0, 2, b"y" * 100)
                        for _ in range(5)])  # fmt: skip
        bob.wait_for(lambda: queued(relay_proc, h) == 0, "bob to take the blocks")
    assert fragments_kept(bob) == 0
    bob.stop()
    assert bob.proc is not None
    log = bob.proc.stderr()
    # Counted, in one line: never one line per fragment.
    assert len([line for line in log.splitlines() if "partial message" in line]) == 1, log


def test_contacts_filling_the_partial_total_do_not_keep_others_out(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Past the total of partial messages (lowered here) the oldest partial of the contact
    holding the most goes: another contact's multi-block text still arrives (review of
    issue 15, finding 9)."""
    from aegisd.services.inbox import SETTING_MAX_PARTIALS

    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(alice, bob)
    connect(carol, bob)
    set_offline(bob, SETTING_MAX_PARTIALS, 3)
    alice.stop()
    url = url_of(relay_proc)
    with hostile(alice.home, "bob") as h:
        h.deposit(url, [h.fragment_block(os.urandom(wire.MSG_ID_LEN), 0, 2, b"x" * 100)
                        for _ in range(3)] + h.payload_blocks(text("filled")))  # fmt: skip
    bob.wait_for(lambda: received(bob, "alice", "filled"), "alice's partials")
    assert fragments_kept(bob) == 3
    long = "long " * (3 * wire.RATCHET_CAPACITY // 5)  # several blocks
    carol.call("messages.send", {"contact": "bob", "text": long})
    bob.wait_for(lambda: received(bob, "carol", long), "carol's multi-block text")
    assert fragments_kept(bob) == 2  # alice's oldest made room; carol's completed


# --- item 14: contact requests through the address ---------------------------------------------


def test_requests_from_one_identity_are_merged_and_pending_ones_capped(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    for p in (alice, bob, carol):
        p.wait_connected()
    address = bob.call("address.get")["link"]
    for _ in range(3):  # three first contacts from one identity
        alice.call("contacts.add", {"name": "bob", "link": address})
        alice.call("contacts.remove", {"name": "bob"})
    alice.call("contacts.add", {"name": "bob", "link": address})  # the newest is kept
    bob.wait_for(lambda: len(bob.events(types=["contact.request"])) >= 1, "a request")
    time.sleep(2)  # any further request would have arrived by now (they were sent first)
    (req,) = bob.call("requests.list")["requests"]
    # The request the user accepts answers alice's current attempt: its session is the newest.
    bob.call("requests.accept", {"request": req["request"]})
    alice.wait_for(
        lambda: alice.call("contacts.list")["contacts"][0]["established"], "bob's answer"
    )
    alice.call("messages.send", {"contact": "bob", "text": "merged"})
    bob.wait_for(lambda: received(bob, "alice", "merged"), "the text")

    # The total of pending requests is capped (lowered here): one more identity is not kept.
    bob.stop()
    s = offline_store(bob)
    s.set_setting("requests.max_pending", 1)
    s.close()
    bob.start()
    bob.wait_connected()
    dave = peers("dave")
    dave.wait_connected()
    carol.call("contacts.add", {"name": "bob", "link": address})
    bob.wait_for(lambda: len(bob.call("requests.list")["requests"]) == 1, "carol's request")
    dave.call("contacts.add", {"name": "bob", "link": address})
    time.sleep(2)
    (only,) = bob.call("requests.list")["requests"]
    assert only["name"] == "carol"


def test_a_re_signed_identity_is_the_same_identity(peers: Callable[[str], Peer]) -> None:
    """The holder of an identity can sign its binding again (another nonce): other bytes, the
    same keys. Its requests are still merged into one, and once blocked it stays blocked
    (review of issue 15, finding 4)."""
    from tests.support.hostile import resign_profile

    alice, bob = peers("alice"), peers("bob")
    for p in (alice, bob):
        p.wait_connected()
    address = bob.call("address.get")["link"]
    alice.call("contacts.add", {"name": "bob", "link": address})
    bob.wait_for(lambda: len(bob.call("requests.list")["requests"]) == 1, "the request")
    alice.call("contacts.remove", {"name": "bob"})
    alice.stop()
    resign_profile(alice.home)
    alice.start()
    alice.wait_connected()
    alice.call("contacts.add", {"name": "bob", "link": address})
    time.sleep(3)  # a second request would be listed by now
    (req,) = bob.call("requests.list")["requests"]
    bob.call("requests.accept", {"request": req["request"]})
    alice.wait_for(
        lambda: alice.call("contacts.list")["contacts"][0]["established"], "bob's answer"
    )
    (contact,) = bob.call("contacts.list")["contacts"]
    bob.call("contacts.block", {"name": contact["name"]})
    alice.call("contacts.remove", {"name": "bob"})
    alice.stop()
    resign_profile(alice.home)
    alice.start()
    alice.wait_connected()
    alice.call("contacts.add", {"name": "bob", "link": address})
    time.sleep(3)
    assert bob.call("requests.list")["requests"] == []


# --- item 10: relay URLs chosen by a contact -----------------------------------------------------


class Listener:
    """A TCP listener of the contact's choosing that counts who knocks: it closes each
    connection at once, or, with ``hold``, keeps it open without a word (then ``most`` is the
    most connections open at once)."""

    def __init__(self, host: str, hold: bool = False) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.most = 0
        self.hold = hold
        self._open: list[Any] = []
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import select

        while not self._closed:
            try:
                ready, _, _ = select.select([self.sock, *self._open], [], [], 0.2)
                for s in ready:
                    if s is self.sock:
                        conn, _ = self.sock.accept()
                        self.count += 1
                        if self.hold:
                            self._open.append(conn)
                            self.most = max(self.most, len(self._open))
                        else:
                            conn.close()
                    elif not s.recv(65536):  # the daemon gave up this one
                        self._open.remove(s)
                        s.close()
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for s in self._open:
            s.close()


def descriptor(url: str) -> wire.AttachmentPayload:
    from aegisd.core.attachment import data_blocks

    return wire.AttachmentPayload(
        os.urandom(wire.MESSAGE_ID_LEN), time.time_ns() // 1_000_000, os.urandom(32), 1000,
        data_blocks(1000), os.urandom(32), url, "file.txt",
    )  # fmt: skip


def set_offline(peer: Peer, name: str, value: Any) -> None:
    peer.stop()
    s = offline_store(peer)
    s.set_setting(name, value)
    s.close()
    peer.start()
    peer.wait_connected()


def test_relay_urls_of_a_contact_are_held_to_a_stricter_policy_bounded_and_stopped(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    set_offline(bob, "attachments.fetch_tries", 3)
    alice.stop()
    url = url_of(relay_proc)
    elsewhere = Listener("127.0.0.2")  # loopback, but not the host of bob's relay
    here = Listener("127.0.0.1")  # the host of bob's relay: allowed, and unreachable as a relay
    try:
        refused = [
            f"ws://127.0.0.2:{elsewhere.port}/v1/ws",
            f"wss://127.0.0.2:{elsewhere.port}/v1/ws",
            f"wss://localhost.localdomain:{elsewhere.port}/v1/ws",
            f"wss://[::127.0.0.2]:{elsewhere.port}/v1/ws",  # IPv4-compatible 127.0.0.2
            f"wss://127.0.0.0x2:{elsewhere.port}/v1/ws",  # what inet_aton reads as 127.0.0.2
            "wss://10.1.2.3/v1/ws",
            "wss://169.254.169.254/latest",
            "wss://[::ffff:127.0.0.2]/v1/ws",
            "wss://127.1/v1/ws",
            "wss://printer.local/v1/ws",
            "ws://relay.example.org/v1/ws",  # plaintext to a host that is not bob's relay
        ]
        with hostile(alice.home, "bob") as h:
            blocks = [b for u in refused for b in h.payload_blocks(descriptor(u))]
            h.deposit(url, blocks + h.payload_blocks(text("after the descriptors")))
        bob.wait_for(lambda: received(bob, "alice", "after the descriptors"), "the text")
        assert bob.call("attachments.list")["attachments"] == []
        assert elsewhere.count == 0

        # Allowed (bob's own relay host), but nothing answers there: given up after 3 tries,
        # visibly.
        with hostile(alice.home, "bob") as h:
            h.deposit(url, h.payload_blocks(descriptor(f"ws://127.0.0.1:{here.port}/v1/ws")))
        failed = bob.wait_for(lambda: bob.events(types=["attachment.failed"]), "the give-up", 60)
        assert "could not be reached" in failed[0]["data"]["reason"]
        (a,) = bob.call("attachments.list")["attachments"]
        assert a["state"] == "failed" and "gave up after 3 tries" in a["error"]
        # Each try is one connection attempt (aiohttp may knock twice for one): no more after.
        assert 3 <= here.count <= 6

        # Another, then the contact is blocked: the download stops at once, for good.
        set_offline(bob, "attachments.fetch_tries", 1000)
        with hostile(alice.home, "bob") as h:
            h.deposit(url, h.payload_blocks(descriptor(f"ws://127.0.0.1:{here.port}/v1/ws")))
        bob.wait_for(lambda: here.count >= 5, "the download to knock")
        bob.call("contacts.block", {"name": "alice"})
        states = {x["state"] for x in bob.call("attachments.list")["attachments"]}
        assert states == {"failed"}
        assert "blocked" in bob.call("attachments.list")["attachments"][-1]["error"]
        knocks = here.count
        bob.stop()
        bob.start()  # and not after a restart either
        time.sleep(3)
        assert here.count == knocks
    finally:
        elsewhere.close()
        here.close()


# --- item 12: session-renewal requests -----------------------------------------------------------


def contact_mailboxes(peer: Peer) -> int:
    s = offline_store(peer)
    try:
        return len([r for r in s.list_mailboxes("contact") if r.contact_id is not None])
    finally:
        s.close()


def test_renewal_requests_are_bounded_and_superseded_mailboxes_retired(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    from aegisd.services.renewal import RENEWALS_PER_DAY

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    assert contact_mailboxes(bob) == 1
    bundle = wire.ContactLink.from_text(alice.call("address.get")["link"]).bundle_address
    alice.stop()
    url = url_of(relay_proc)
    now = time.time_ns() // 1_000_000
    with sqlite3.connect(relay_proc.data / "relay.sqlite3", timeout=10) as db:
        before = db.execute("SELECT count(*) FROM mailboxes").fetchone()[0]  # before the burst
    with hostile(alice.home, "bob") as h:
        # Each newer than the last (so each passes the replay bound); nobody ever answers.
        h.deposit(url, [h.renewal_block(now + i, bundle)
                        for i in range(RENEWALS_PER_DAY + 4)])  # fmt: skip
        bob.wait_for(lambda: queued(relay_proc, h) == 0, "bob to take the requests")
    renewing = bob.events(types=["contact.session_renewing"])
    assert len(renewing) == RENEWALS_PER_DAY
    # One mailbox for the session in use, one for the latest renewal: the superseded ones are
    # gone, here and at the relay.
    assert contact_mailboxes(bob) == 2
    bob.stop()
    bob.start()
    bob.wait_connected()
    # At the relay too: one mailbox more than before the burst (the latest renewal's).
    with sqlite3.connect(relay_proc.data / "relay.sqlite3", timeout=10) as db:
        assert db.execute("SELECT count(*) FROM mailboxes").fetchone()[0] == before + 1
    assert bob.call("invitations.create")["link"]  # the user's own operations still work


def relay_mailboxes(relay: RelayProcess) -> int:
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        return int(db.execute("SELECT count(*) FROM mailboxes").fetchone()[0])


def test_a_refused_renewal_leaves_no_mailbox_and_tries_count_against_the_limit(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Renewal requests whose reply mailbox does not exist: each answer's deposit is refused,
    and the mailbox made for it goes, here and at the relay (review of issue 15, finding 3).
    Requests whose bundle the relay denies count against the daily limit too."""
    from aegisd.services.renewal import RENEWALS_PER_DAY

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    bundle = wire.ContactLink.from_text(alice.call("address.get")["link"]).bundle_address
    alice.stop()
    url = url_of(relay_proc)
    before = relay_mailboxes(relay_proc)
    now = time.time_ns() // 1_000_000
    with hostile(alice.home, "bob") as h:
        nowhere = wire.MailboxAddress(url, os.urandom(len(h.send_to.deposit_id)), b"")
        h.deposit(url, [h.renewal_block(now + i, bundle, nowhere)
                        for i in range(RENEWALS_PER_DAY)])  # fmt: skip
        bob.wait_for(lambda: queued(relay_proc, h) == 0, "bob to take the requests")
    bob.wait_for(
        lambda: len(bob.events(types=["contact.renewal_failed"])) >= 1, "a refused renewal"
    )
    bob.wait_for(lambda: contact_mailboxes(bob) == 1, "the refused renewals' mailboxes to go")
    bob.wait_for(lambda: relay_mailboxes(relay_proc) == before, "their deletion at the relay")

    # A denied bundle counts too: with the limit reached, a valid request is not answered.
    carol, dave = peers("carol"), peers("dave")
    connect(carol, dave)
    carol_bundle = wire.ContactLink.from_text(carol.call("address.get")["link"]).bundle_address
    carol.stop()
    with hostile(carol.home, "dave") as h:
        later = time.time_ns() // 1_000_000
        nothing = os.urandom(len(carol_bundle))  # a bundle address the relay does not know
        h.deposit(url, [h.renewal_block(later + i, nothing) for i in range(RENEWALS_PER_DAY)])
        dave.wait_for(lambda: queued(relay_proc, h) == 0, "dave to take the requests")
        h.deposit(url, [h.renewal_block(later + RENEWALS_PER_DAY, carol_bundle)])
        dave.wait_for(lambda: queued(relay_proc, h) == 0, "dave to take the valid one")
    time.sleep(2)  # an answer would have been made by now
    assert dave.events(types=["contact.session_renewing"]) == []


def test_renewal_requests_whose_bundle_the_relay_refuses(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Issue 15 review, finding 2: a bundle address of 17 bytes made the relay answer
    `bad_frame` and close the user's (shared) connection, again at every retry, for up to 14
    days. Now: refused when decoded, like one the relay denies: dropped (acknowledged). A limit
    is no reason to drop: the request waits at the relay and is answered once it is lifted."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    bundle = wire.ContactLink.from_text(alice.call("address.get")["link"]).bundle_address
    alice.stop()
    url = url_of(relay_proc)
    now = time.time_ns() // 1_000_000
    with hostile(alice.home, "bob") as h:
        h.deposit(url, [h.renewal_block_with_address(now, os.urandom(17)),
                        h.renewal_block(now + 1, os.urandom(16))])  # fmt: skip
        bob.wait_for(lambda: queued(relay_proc, h) == 0, "bob to drop both requests")
        assert bob.events(types=["contact.session_renewing"]) == []
        bob.wait_connected()
        # Every connection is out of bundle fetches: `limit`, then `rate_limited`.
        relay_proc.terminate()
        relay_proc.options["--bundle-fetches-per-connection"] = "0"
        relay_proc.start()
        h.deposit(url, [h.renewal_block(now + 2, bundle)])
        h.deposit(url, h.payload_blocks(text("after the request")))
        bob.wait_for(lambda: received(bob, "alice", "after the request"), "the text after it")
        # The text's acknowledgement may still be on its way; the request stays: not
        # acknowledged, not dropped.
        bob.wait_for(lambda: queued(relay_proc, h) == 1, "the text acknowledged")
        time.sleep(1)
        assert queued(relay_proc, h) == 1
        relay_proc.terminate()
        del relay_proc.options["--bundle-fetches-per-connection"]
        relay_proc.start()
        bob.wait_for(lambda: bob.events(types=["contact.session_renewing"]), "the answer")
        bob.wait_for(lambda: queued(relay_proc, h) == 0, "the request acknowledged")


def test_own_operations_work_past_the_relays_creations_per_connection(tmp_short: Path) -> None:
    """The link's connection may create only so many mailboxes (lowered here): invitations
    still work past it (a connection of their own takes over)."""
    sub = tmp_short / "relay-low"
    sub.mkdir()
    rp = RelayProcess(sub, {"--creates-per-connection": "4"})
    rp.start()
    bob = None
    try:
        bob = Peer(tmp_short / "bob", url_of(rp), "bob")
        bob.wait_connected()
        links = {bob.call("invitations.create")["link"] for _ in range(8)}
        assert len(links) == 8
    finally:
        if bob is not None:
            bob.stop()
        rp.close()


def test_a_contacts_many_files_download_a_few_at_a_time(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    from aegisd.services.attachments import DOWNLOADS_PER_CONTACT

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    silent = Listener("127.0.0.1", hold=True)  # the own relay's host: allowed; never answers
    try:
        with hostile(alice.home, "bob") as h:
            h.deposit(url_of(relay_proc), [
                b for _ in range(3 * DOWNLOADS_PER_CONTACT)
                for b in h.payload_blocks(descriptor(f"ws://127.0.0.1:{silent.port}/v1/ws"))
            ])  # fmt: skip
        bob.wait_for(lambda: len(bob.call("attachments.list")["attachments"])
                     == 3 * DOWNLOADS_PER_CONTACT, "the descriptors")  # fmt: skip
        bob.wait_for(lambda: silent.most >= DOWNLOADS_PER_CONTACT, "the downloads to connect")
        time.sleep(2)  # any other download would have connected by now
        assert silent.most == DOWNLOADS_PER_CONTACT
    finally:
        silent.close()


def test_blocking_stops_the_outbox_and_stored_peer_urls_are_held_to_the_policy(
    peers: Callable[[str], Peer],
) -> None:
    """Blocks queued to a contact that is then blocked are dropped, not retried (also after a
    restart); a destination stored before the peer-URL policy (127.0.0.2: loopback, but not
    bob's relay) is never dialled (review of issue 15, finding 2)."""
    from aegisd.services.mailbox import address_to_bytes

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    here = Listener("127.0.0.1")  # bob's relay's host: allowed, nothing answers as a relay
    elsewhere = Listener("127.0.0.2")
    try:
        bob.stop()
        s = offline_store(bob)
        try:
            (cid,) = [c.id for c in s.list_contacts() if c.name == "alice"]
            for port, host in ((here.port, "127.0.0.1"), (elsewhere.port, "127.0.0.2")):
                dest = wire.MailboxAddress(f"ws://{host}:{port}/v1/ws", os.urandom(16), b"")
                s.enqueue_blocks(address_to_bytes(dest), [b"x" * 100], contact_id=cid)
        finally:
            s.close()
        bob.start()
        bob.wait_for(lambda: here.count >= 2, "the outbox to retry the allowed destination")
        assert elsewhere.count == 0
        bob.call("contacts.block", {"name": "alice"})
        time.sleep(1)  # a connection attempt already under way when the block was made
        knocks = here.count
        time.sleep(3)
        assert here.count == knocks
        bob.stop()
        s = offline_store(bob)
        try:
            assert s._q("SELECT count(*) FROM outbox").fetchone()[0] == 0
        finally:
            s.close()
        bob.start()
        bob.wait_connected()
        time.sleep(2)
        assert here.count == knocks and elsewhere.count == 0
    finally:
        here.close()
        elsewhere.close()


def test_a_profiles_mailboxes_are_capped(peers: Callable[[str], Peer]) -> None:
    """A profile owns at most so many mailboxes (lowered here; by default below the relay's
    subscriptions per connection): past it, a clear error instead of mailboxes that are never
    subscribed (review of issue 15, finding 7)."""
    import pytest

    from aegis_client.errors import RpcError
    from aegisd.services.mailboxes import SETTING_MAX_MAILBOXES

    bob = peers("bob")
    bob.wait_connected()
    bob.call("invitations.create")
    owned = len(offline_store_count(bob))
    set_offline(bob, SETTING_MAX_MAILBOXES, owned)
    with pytest.raises(RpcError) as e:
        bob.call("invitations.create")
    err = e.value.to_object()
    assert err["code"] == 1048 and err["data"]["error"] == "too_many_mailboxes", err


def offline_store_count(peer: Peer) -> list[int]:
    peer.stop()
    s = offline_store(peer)
    try:
        return [int(r[0]) for r in s._q("SELECT id FROM mailboxes").fetchall()]
    finally:
        s.close()
        peer.start()


def test_removing_a_contact_stops_its_downloads(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """A file whose relay (the contact's choice) does not answer: removing the contact stops
    the download at once, also after a restart (review of issue 15, finding 11)."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    here = Listener("127.0.0.1")  # bob's relay's host: allowed, nothing answers as a relay
    try:
        with hostile(alice.home, "bob") as h:
            h.deposit(url_of(relay_proc),
                      h.payload_blocks(descriptor(f"ws://127.0.0.1:{here.port}/v1/ws")))
        bob.wait_for(lambda: here.count >= 2, "the download to knock")
        bob.call("contacts.remove", {"name": "alice"})
        assert bob.call("attachments.list")["attachments"] == []
        time.sleep(1)  # a connection attempt already under way
        knocks = here.count
        time.sleep(3)
        assert here.count == knocks
        bob.stop()
        bob.start()
        bob.wait_connected()
        time.sleep(2)
        assert here.count == knocks
    finally:
        here.close()


def test_a_relay_the_user_trusts_counts_as_its_own(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """network.trusted_relays (aegis network --trust-relay URL): a relay on the user's network
    that contacts use passes the policy for relays chosen by others, as the user's own does;
    without it, the same descriptor is never dialled."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    url = url_of(relay_proc)
    lan = Listener("127.0.0.2")  # stands for a relay on the user's network
    lan_url = f"ws://127.0.0.2:{lan.port}/v1/ws"
    try:
        with hostile(alice.home, "bob") as h:
            h.deposit(url, h.payload_blocks(descriptor(lan_url)) + h.payload_blocks(
                text("first")))
        bob.wait_for(lambda: received(bob, "alice", "first"), "the text")
        assert lan.count == 0 and bob.call("attachments.list")["attachments"] == []
        with pytest.raises(RpcCallError) as e:
            bob.call("network.set", {"trusted_relays": ["http://x"]})
        assert e.value.code == -32602 and e.value.data["field"] == "trusted_relays"
        got = bob.call("network.set", {"trusted_relays": [lan_url]})
        assert got["trusted_relays"] == [lan_url]
        with hostile(alice.home, "bob") as h:
            h.deposit(url, h.payload_blocks(descriptor(lan_url)))
        bob.wait_for(lambda: lan.count > 0, "the trusted relay to be dialled")
        assert bob.call("network.get")["trusted_relays"] == [lan_url]
    finally:
        lan.close()
