"""Files to a group (docs/protocol.md §25.10) between real daemons on a real relay: one copy
per member, each fetched by its member alone and deleted at the relay once verified; the
receivers see the file in the group's history and save it; a member removed gets no file sent
after the removal; a member's descriptor is bounded like a contact's, a removed member's
dropped."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aegisd.core import wire
from aegisd.services.mailbox import ContactState
from aegisd.store import groups as G
from tests.functional.conftest import Peer, connect
from tests.functional.test_attachments import STORED_BLOB_LEN, blob_sizes, wait_state
from tests.functional.test_cli_messaging import aegis, ok
from tests.functional.test_groups import (
    group_of,
    hidden_contacts,
    invited,
    key_of,
    members,
    outbox_size,
    waiting_at_relay,
)
from tests.functional.test_hostile_contact import Listener, offline_store, queued, url_of
from tests.relay.conftest import RelayProcess
from tests.support.hostile import hostile

T = 60.0
NAME = "Photos of Europa 3c9d"


def history(peer: Peer) -> list[dict[str, Any]]:
    g = group_of(peer)
    assert g is not None
    out: list[dict[str, Any]] = peer.call("group.history", {"group": g["group"]})["messages"]
    return out


def file_in_history(peer: Peer, name: str) -> dict[str, Any] | None:
    return next((m for m in history(peer) if m["text"] == f"[file] {name}"), None)


def group_of_three(alice: Peer, bob: Peer, carol: Peer) -> tuple[int, dict[str, str]]:
    """alice's group with bob and carol, who are not contacts: they meet through it."""
    for p in (bob, carol):
        connect(p, alice)
    ed = {p.name: key_of(p) for p in (alice, bob, carol)}
    g = alice.call("group.create", {"name": NAME})["group"]
    for p in (bob, carol):
        alice.call("group.invite", {"group": g, "contact": p.name})
        p.call("group.accept", {"invitation": invited(p)})
        p.wait_for(lambda p=p: ed[p.name] in members(p), f"{p.name}'s add", T)
    for p in (alice, bob, carol):
        p.wait_for(lambda p=p: len(members(p)) == 3, f"{p.name} to see three members", T)
    bob.wait_for(lambda: members(bob)[ed["carol"]]["reachable"], "bob's session to carol", T)
    return g, ed


def test_a_file_to_a_group_of_three(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    g, ed = group_of_three(alice, bob, carol)
    assert hidden_contacts(bob) != []  # carol is bob's group contact only

    # bob sends a file (three blocks) to the group, through the CLI;
    # alice and carol are offline meanwhile, so their copies wait at the relay.
    data = os.urandom(2 * wire.ATTACHMENT_CHUNK_LEN + 1000)
    src = tmp_short / "europa.jpg"
    src.write_bytes(data)
    alice.stop()
    carol.stop()
    sent = json.loads(ok(aegis(bob, "send", "--group", NAME, "--file", str(src), "--json")))
    assert sent["recipients"] == 2 and sent["unreachable"] == 0 and sent["name"] == "europa.jpg"
    copies = sent["attachments"]
    assert len(copies) == 2 and len(set(copies)) == 2 and sent["message_id"] not in copies
    blocks = wire.attachment_blocks(len(data))
    for aid in copies:
        wait_state(bob, aid, "uploaded")
    # Two copies at the relay, each of the padded count, under blob ids of their own.
    sizes = blob_sizes(relay_proc)
    assert len(sizes) == 2 * blocks and set(sizes) == {STORED_BLOB_LEN}
    alice.start()

    # alice gets it in the group's history, fetches her copy, verifies it and deletes it:
    # carol's copy alone stays at the relay.
    item = alice.wait_for(lambda: file_in_history(alice, "europa.jpg"), "alice's file", T)
    aid = item["attachment_id"]
    # the message is named by author and id (another member's copy of the id cannot suppress
    # it); the attachment by a random local id: its spool on disk does not name the sender
    assert item["message_id"] == f"{ed['bob']}:{sent['message_id']}" and item["from"] == ed["bob"]
    assert len(aid) == 32 and int(aid, 16) >= 0 and aid != sent["message_id"]
    assert not any(ed["bob"] in p.name for p in (alice.home / "attachments").iterdir())
    wait_state(alice, aid, "complete")
    alice.wait_for(lambda: len(blob_sizes(relay_proc)) == blocks, "alice's copy deleted", T)
    saved = tmp_short / "alice.jpg"
    alice.call("attachments.save", {"attachment_id": aid, "path": str(saved)})
    assert saved.read_bytes() == data
    # The CLI shows the file in the group's history, with how to save it.
    shown = ok(aegis(alice, "messages", "--group", NAME))
    assert "[file] europa.jpg" in shown and f"aegis attachment save {aid}" in shown

    # carol comes back: she gets her own copy (bob's group contact, not hers to alice).
    carol.start()
    item = carol.wait_for(lambda: file_in_history(carol, "europa.jpg"), "carol's file", T)
    wait_state(carol, item["attachment_id"], "complete")
    saved = tmp_short / "carol.jpg"
    carol.call("attachments.save", {"attachment_id": item["attachment_id"], "path": str(saved)})
    assert saved.read_bytes() == data
    carol.wait_for(lambda: blob_sizes(relay_proc) == [], "every copy deleted at the relay", T)
    # Delivery per member, from the receipts: "delivered to 2 of 2".
    bob.wait_for(
        lambda: file_in_history(bob, "europa.jpg")["delivery"]["delivered"] == 2,  # type: ignore[index]
        "receipts from both", T,
    )  # fmt: skip
    assert [e["data"]["attachment_id"] for e in carol.events(types=["attachment.received"])] == [
        item["attachment_id"]]  # fmt: skip

    # carol is removed; a file alice sends afterwards goes to bob alone.
    alice.call("group.remove", {"group": g, "member": "carol"})
    carol.wait_for(lambda: group_of(carol)["role"] is None, "carol's removal", T)  # type: ignore[index]
    bob.wait_for(lambda: ed["carol"] not in members(bob), "bob to apply the removal", T)
    later = tmp_short / "after.txt"
    later.write_bytes(b"after the removal\n")
    after = alice.call("group.send_file", {"group": g, "path": str(later)})
    assert after["recipients"] == 1 and len(after["attachments"]) == 1
    item = bob.wait_for(lambda: file_in_history(bob, "after.txt"), "bob's second file", T)
    wait_state(bob, item["attachment_id"], "complete")
    alice.wait_for(lambda: outbox_size(alice) == 0, "alice's outbox to drain", T)
    carol.wait_for(lambda: waiting_at_relay(relay_proc, alice, "carol") == 0, "carol's take", T)
    assert file_in_history(carol, "after.txt") is None
    got = carol.events(types=["attachment.received"])
    assert [e["data"]["name"] for e in got] == ["europa.jpg"]
    bob.wait_for(lambda: blob_sizes(relay_proc) == [], "bob's copy deleted", T)

    # A member's descriptor is bounded like a contact's: one over alice's size limit is kept
    # failed (nothing fetched); a removed member's file is dropped whatever it claims.
    s = offline_store(alice)
    try:
        group_id = G.list_groups(s)[0].group_id
    finally:
        s.close()
    version = group_of(alice)["version"]  # type: ignore[index]
    big = 120_000_000  # over the default attachments.max_size (100 MB), within the format

    def forged(name: str, size: int) -> wire.GroupFilePayload:
        return wire.GroupFilePayload(group_id, version, wire.AttachmentPayload(
            os.urandom(16), int(time.time() * 1000), os.urandom(32), size,
            wire.attachment_blocks(size), os.urandom(32), url_of(relay_proc), name))  # fmt: skip

    for peer, name, size in ((bob, "huge.bin", big), (carol, "from-the-removed.bin", 10)):
        peer.stop()
        with hostile(peer.home, "alice") as h:
            h.deposit(url_of(relay_proc), h.payload_blocks(forged(name, size)))
            alice.wait_for(lambda h=h: queued(relay_proc, h) == 0, "alice to take it", T)
    huge = alice.wait_for(lambda: file_in_history(alice, "huge.bin"), "the huge file", T)
    failed = alice.call("attachments.get", {"attachment_id": huge["attachment_id"]})
    assert failed["state"] == "failed" and "limit" in failed["error"] and failed["done"] == 0
    assert file_in_history(alice, "from-the-removed.bin") is None
    names = [a["name"] for a in alice.call("attachments.list")["attachments"]]
    assert "from-the-removed.bin" not in names


def test_a_member_removed_during_the_upload_gets_no_copy(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """Membership is judged again when a copy's upload ends: a member removed meanwhile gets
    no descriptor, the sender deletes that copy's blobs, and counts the member unreachable."""
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    g, _ = group_of_three(alice, bob, carol)
    src = tmp_short / "plans.pdf"
    src.write_bytes(os.urandom(40_000))
    relay_proc.terminate()  # no copy can be uploaded before the removal
    sent = alice.call("group.send_file", {"group": g, "path": str(src)})
    assert sent["recipients"] == 2
    # A second file, whose copy for bob alice deletes before it is up: bob counts as failed
    # (and carol, removed, unreachable).
    draft = tmp_short / "draft.txt"
    draft.write_bytes(b"a draft\n")
    for aid in alice.call("group.send_file", {"group": g, "path": str(draft)})["attachments"]:
        if alice.call("attachments.get", {"attachment_id": aid})["contact"] == "bob":
            alice.call("attachments.delete", {"attachment_id": aid})
    alice.call("group.remove", {"group": g, "member": "carol"})  # applied here at once
    relay_proc.start()  # on the same listening socket: the same URL
    item = bob.wait_for(lambda: file_in_history(bob, "plans.pdf"), "bob's file", T)
    wait_state(bob, item["attachment_id"], "complete")
    copies = {alice.call("attachments.get", {"attachment_id": a})["contact"]: a
              for a in sent["attachments"]}  # fmt: skip
    carols = wait_state(alice, copies["carol"], "failed")
    assert "not sent" in carols["error"]
    # carol's copy was never named to anyone: alice deleted its blobs; bob deleted his.
    alice.wait_for(lambda: blob_sizes(relay_proc) == [], "every blob deleted", T)
    delivery = file_in_history(alice, "plans.pdf")["delivery"]  # type: ignore[index]
    assert delivery["members"]["carol"] == "unreachable" and delivery["recipients"] == 2
    carol.wait_for(lambda: group_of(carol)["role"] is None, "carol's removal", T)  # type: ignore[index]
    alice.wait_for(lambda: outbox_size(alice) == 0, "alice's outbox to drain", T)
    carol.wait_for(lambda: waiting_at_relay(relay_proc, alice, "carol") == 0, "carol's take", T)
    assert file_in_history(carol, "plans.pdf") is None
    assert carol.events(types=["attachment.received"]) == []
    alice.wait_for(
        lambda: file_in_history(alice, "draft.txt")["delivery"]["members"]  # type: ignore[index]
        == {"bob": "failed", "carol": "unreachable"}, "the draft's statuses", T,
    )  # fmt: skip
    alice.wait_for(lambda: blob_sizes(relay_proc) == [], "the draft's blobs deleted too", T)
    bob.wait_for(lambda: waiting_at_relay(relay_proc, alice, "bob") == 0, "bob's take", T)
    assert file_in_history(bob, "draft.txt") is None


def group_id_of(peer: Peer, index: int = 0) -> bytes:
    s = offline_store(peer)
    try:
        return G.list_groups(s)[index].group_id
    finally:
        s.close()


def forged_file(group_id: bytes, version: int, message_id: bytes, url: str,
                name: str, size: int = 10) -> wire.GroupFilePayload:  # fmt: skip
    return wire.GroupFilePayload(group_id, version, wire.AttachmentPayload(
        message_id, int(time.time() * 1000), os.urandom(32), size, wire.attachment_blocks(size),
        os.urandom(32), url, name))  # fmt: skip


def test_a_member_copying_a_files_id_suppresses_nothing(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """carol, hostile, sends alice a file of hers under the id of bob's file before bob's
    descriptor reaches alice: alice still gets, fetches and saves bob's file, and bob sees it
    delivered. The same author and id as a text in another group is not a file there."""
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    g, ed = group_of_three(alice, bob, carol)
    src = tmp_short / "orbit.bin"
    data = os.urandom(30_000)
    src.write_bytes(data)
    relay_proc.terminate()  # bob's copies cannot go up yet: his descriptor waits
    sent = bob.call("group.send_file", {"group": g, "path": str(src)})
    mid = bytes.fromhex(sent["message_id"])
    bob.stop()
    relay_proc.start()
    # A second group, alice's with carol alone, for the same id in another group.
    g2 = alice.call("group.create", {"name": "Second 71fe"})["group"]
    alice.call("group.invite", {"group": g2, "contact": "carol"})
    carol.call("group.accept", {"invitation": invited(carol)})
    alice.wait_for(lambda: len(alice.call("group.get", {"group": g2})["members"]) == 2,
                   "carol in the second group", T)  # fmt: skip
    s = offline_store(alice)
    try:
        by_ref = {row.id: row.group_id for row in G.list_groups(s)}
    finally:
        s.close()
    v1 = alice.call("group.get", {"group": g})["version"]
    v2 = alice.call("group.get", {"group": g2})["version"]
    carol.stop()
    squat = forged_file(by_ref[g], v1, mid, url_of(relay_proc), "squat.bin")
    text = wire.GroupMessagePayload(by_ref[g2], v2, mid, int(time.time() * 1000), "same id")
    with hostile(carol.home, "alice") as h:
        h.deposit(url_of(relay_proc), h.payload_blocks(squat) + h.payload_blocks(text))
        alice.wait_for(lambda: queued(relay_proc, h) == 0, "alice to take carol's", T)
    def in_group(ref: int, text: str) -> dict[str, Any] | None:
        messages = alice.call("group.history", {"group": ref})["messages"]
        return next((m for m in messages if m["text"] == text), None)

    got = alice.wait_for(lambda: in_group(g, "[file] squat.bin"), "carol's file", T)
    assert got["message_id"] == f"{ed['carol']}:{sent['message_id']}"
    other = alice.wait_for(lambda: in_group(g2, "same id"), "carol's text", T)
    # the same author and id in another group: the text is no file for all that
    assert other["message_id"] == got["message_id"] and "attachment_id" not in other

    bob.start()
    item = alice.wait_for(lambda: in_group(g, "[file] orbit.bin"), "bob's file", T)
    assert item["message_id"] == f"{ed['bob']}:{sent['message_id']}"
    assert item["attachment_id"] != got["attachment_id"]
    wait_state(alice, item["attachment_id"], "complete")
    saved = tmp_short / "saved.bin"
    alice.call("attachments.save", {"attachment_id": item["attachment_id"], "path": str(saved)})
    assert saved.read_bytes() == data
    bob.wait_for(
        lambda: file_in_history(bob, "orbit.bin")["delivery"]["members"].get("alice")  # type: ignore[index]
        == "delivered", "alice's delivery receipt", T,
    )  # fmt: skip


def test_a_members_pending_files_are_capped_and_its_name_stays_hidden(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """carol, a group contact of bob's only, pushes him files whose relay never answers: past
    bob's cap on a member's pending files (lowered to 2 here) a file is kept failed, never
    fetched; listings and events name carol as nobody (null), as group.message does."""
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    g, _ = group_of_three(alice, bob, carol)
    hidden = hidden_contacts(carol)
    assert len(hidden) == 1  # bob, as carol knows him
    s = offline_store(bob)
    try:
        s.set_setting("groups.files.max_pending", 2)
    finally:
        s.close()
    group_id = group_id_of(bob)
    version = bob.call("group.get", {"group": g})["version"]
    here = Listener("127.0.0.1")  # the relay carol names: nothing answers there
    url = f"ws://127.0.0.1:{here.port}/v1/ws"
    try:
        carol.stop()
        files = [forged_file(group_id, version, os.urandom(16), url, f"push{i}.bin")
                 for i in range(3)]  # fmt: skip
        with hostile(carol.home, hidden[0]) as h:
            h.deposit(url_of(relay_proc), [b for f in files for b in h.payload_blocks(f)])
            bob.wait_for(lambda: queued(relay_proc, h) == 0, "bob to take carol's", T)
        listed = bob.wait_for(
            lambda: (lambda a: a if len(a) == 3 else None)(
                bob.call("attachments.list")["attachments"]), "three files listed", T)  # fmt: skip
        states = {a["name"]: a["state"] for a in listed}
        assert states == {"push0.bin": "downloading", "push1.bin": "downloading",
                          "push2.bin": "failed"}  # fmt: skip
        third = next(a for a in listed if a["name"] == "push2.bin")
        assert "too many files from this member" in third["error"] and third["done"] == 0
        assert {a["contact"] for a in listed} == {None}
        received = bob.events(types=["attachment.received"])
        assert len(received) == 3 and {e["data"]["contact"] for e in received} == {None}
        bob.wait_for(lambda: here.count >= 1, "the two allowed downloads to knock", T)
        # The CLI shows such a file without a name for its sender.
        shown = ok(aegis(bob, "attachments"))
        assert "(a group member)" in shown and "None" not in shown
    finally:
        here.close()


def test_a_copy_whose_descriptor_cannot_go_has_its_blobs_deleted(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """bob's contact fails while his copy uploads: the copy fails and its blobs go from the
    relay at once. A member's contact removed before its copy went: its copy's entry goes
    with it (no setting left behind)."""
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    g, _ = group_of_three(alice, bob, carol)
    src = tmp_short / "notes.txt"
    src.write_bytes(os.urandom(20_000))
    bob.stop()
    relay_proc.terminate()
    sent = alice.call("group.send_file", {"group": g, "path": str(src)})
    copies = {alice.call("attachments.get", {"attachment_id": a})["contact"]: a
              for a in sent["attachments"]}  # fmt: skip
    alice.call("contacts.remove", {"name": "carol"})
    s = offline_store(alice)
    try:
        left = [r[0] for r in s._q("SELECT name FROM settings WHERE name LIKE 'group.file.%'")]
        assert left == [f"group.file.{copies['bob']}"]
        c = next(c for c in s.list_contacts() if c.name == "bob")
        state = ContactState.from_bytes(c.state)
        s.update_contact(c.id, state=dataclasses.replace(state, failed="refused").to_bytes())
    finally:
        s.close()
    relay_proc.start()
    failed = wait_state(alice, copies["bob"], "failed")
    assert "failed" in failed["error"]
    alice.wait_for(lambda: blob_sizes(relay_proc) == [], "the failed copy's blobs deleted", T)
    delivery = file_in_history(alice, "notes.txt")["delivery"]  # type: ignore[index]
    assert delivery["members"]["bob"] == "failed"
