"""Replies, reactions, edits, deletions and timers in a group (docs/protocol.md §25.11), between
three real daemons on a real relay: a reply and a reaction of one member seen by the others;
the author's edit applied everywhere and kept in step by the search index (a rare word); delete
for everyone; a caption on a group file; a timer set by one member erasing a text and a
captioned file at every member (the decrypted store pages hold them nowhere); then a hostile
member's forged edit of another's message refused, and an edit arriving before its message
applied when the message comes; a member's flood of timer changes leaving a true history line
and another member's change its line and event; held actions bounded per member; a removed
member's reaction dropped, and one held before its removal dropped when its message comes;
then a member added after the timer was set gets it, a reaction replaced and removed, a
receipt's event going with its message, and a file under a one-second timer reaching both
members."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from tests.functional.conftest import Peer, connect
from tests.functional.test_attachments import wait_state
from tests.functional.test_cli_messaging import aegis, ok
from tests.functional.test_disappearing import plain_pages
from tests.functional.test_group_files import group_id_of
from tests.functional.test_group_reads import NAME, three_member_group
from tests.functional.test_groups import group_of, invited, key_of, members
from tests.functional.test_hostile_contact import queued, url_of
from tests.relay.conftest import RelayProcess
from tests.support.hostile import hostile

T = 60.0


def ref(peer: Peer) -> int:
    g = group_of(peer)
    assert g is not None
    return int(g["group"])


def history(peer: Peer) -> list[dict[str, Any]]:
    return list(peer.call("group.history", {"group": ref(peer)})["messages"])


def find(peer: Peer, key: str, value: Any) -> dict[str, Any] | None:
    return next((m for m in history(peer) if m.get(key) == value), None)


def found(peer: Peer, word: str) -> list[str]:
    hits = peer.call("messages.search", {"query": word, "group": ref(peer)})["results"]
    return [h["message"]["text"] for h in hits]


def test_replies_reactions_edits_deletions_and_a_timer_in_a_group(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    alice, bob, carol = three_member_group(peers)
    keys = {p.name: key_of(p) for p in (alice, bob, carol)}
    sent = alice.call("group.send", {"group": ref(alice), "text": "original plumage"})
    # every member names alice's message by (author, id): hers in her own form
    ids = {"alice": sent["message_id"],
           **{p.name: f"{keys['alice']}:{sent['message_id']}" for p in (bob, carol)}}  # fmt: skip
    for p in (bob, carol):
        p.wait_for(lambda p=p: find(p, "message_id", ids[p.name]), f"{p.name} to get it", T)

    # bob replies, carol reacts: each seen by the two others
    reply = bob.call("messages.reply", {"group": ref(bob), "message_id": ids["bob"],
                                        "text": "a reply to it"})  # fmt: skip
    assert reply["recipients"] == 2 and reply["group"] == ref(bob)
    ok(aegis(carol, "react", ids["carol"], "\U0001f44d", "--group", NAME))  # the CLI's way
    for p in (alice, carol):
        got = p.wait_for(lambda p=p: find(p, "text", "a reply to it"), f"{p.name}: reply", T)
        assert got["reply_to"] == {"message_id": ids[p.name], "text": "original plumage"}
        assert got["from"] == keys["bob"]
    for p in (alice, bob):
        p.wait_for(lambda p=p: find(p, "message_id", ids[p.name])["reactions"]  # type: ignore[index]
                   == [{"emoji": "\U0001f44d", "count": 1, "mine": False}],
                   f"{p.name}: carol's reaction", T)  # fmt: skip
    reacted = alice.events(types=["message.reaction"])[-1]["data"]
    assert reacted["group"] == ref(alice) and reacted["from"] == keys["carol"]
    assert find(carol, "message_id", ids["carol"])["reactions"][0]["mine"] is True  # type: ignore[index]
    shown = ok(aegis(alice, "messages", "--group", NAME, "--ids"))
    assert f"{ids['alice']}  " in shown and "[\U0001f44d 1]" in shown
    assert "[reply to \u201coriginal plumage\u201d] a reply to it" in shown

    # alice edits her message: applied at both, the reply's quote follows, and the search
    # index finds the new rare word and not the old one
    alice.call("messages.edit", {"group": ref(alice), "message_id": ids["alice"],
                                 "text": "edited zeppelin"})  # fmt: skip
    for p in (bob, carol):
        p.wait_for(lambda p=p: find(p, "message_id", ids[p.name])["text"]  # type: ignore[index]
                   == "edited zeppelin", f"{p.name}: the edit", T)  # fmt: skip
        assert find(p, "message_id", ids[p.name])["edits"] == 1  # type: ignore[index]
    for p in (alice, bob, carol):
        assert found(p, "zeppelin") == ["edited zeppelin"], p.name
        assert found(p, "plumage") == [], p.name
    assert find(carol, "text", "a reply to it")["reply_to"]["text"] == "edited zeppelin"  # type: ignore[index]

    # bob deletes his reply for everyone
    bob.call("messages.delete", {"group": ref(bob), "message_id": reply["message_id"],
                                 "for_everyone": True})  # fmt: skip
    reply_ids = {p.name: f"{keys['bob']}:{reply['message_id']}" for p in (alice, carol)}
    for p in (alice, carol):
        p.wait_for(lambda p=p: find(p, "message_id", reply_ids[p.name])["deleted"],  # type: ignore[index]
                   f"{p.name}: the deletion", T)  # fmt: skip
        assert find(p, "message_id", reply_ids[p.name])["text"] == ""  # type: ignore[index]
        assert not any(e["data"].get("text") == "a reply to it"
                       for e in p.events(types=["group.message"]))  # fmt: skip

    # a caption on a group file: carol's copy of it shows it, and so does her event
    src = tmp_short / "harbour.txt"
    src.write_bytes(b"a small file")
    shared = bob.call("group.send_file", {"group": ref(bob), "path": str(src),
                                          "caption": "the harbour at dawn"})  # fmt: skip
    assert shared["caption"] == "the harbour at dawn"
    got = carol.wait_for(lambda: find(carol, "text", "[file] harbour.txt\nthe harbour at dawn"),
                         "carol: the captioned file", T)  # fmt: skip
    assert "attachment_id" in got
    assert any(e["data"].get("caption") == "the harbour at dawn"
               for e in carol.events(types=["group.message"]))  # fmt: skip
    assert carol.call("attachments.get", {"attachment_id": got["attachment_id"]})[
        "caption"] == "the harbour at dawn"

    # carol sets a 20-second timer; alice's next message disappears at all three once read
    # (alice's own file waits past its deadline while its copies are still uploading, so a
    # slow upload is not cut off: disappearing.py UPLOAD_GRACE_MS)
    assert "20 seconds" in ok(aegis(carol, "disappear", "--group", NAME, "20s"))
    for p in (alice, bob):
        p.wait_for(lambda p=p: p.call("conversations.get_timer", {"group": ref(p)})["seconds"]
                   == 20, f"{p.name}: the timer", T)  # fmt: skip
        change = p.events(types=["conversation.timer"])[-1]["data"]
        assert change["group"] == ref(p) and change["by"] == keys["carol"]
    secret = "ephemeral quokka"
    alice.call("group.send", {"group": ref(alice), "text": secret})
    # and a timed file with a caption: its copy and its events go with it
    timed = tmp_short / "wombat.txt"
    timed.write_bytes(b"wombat bytes " * 100)
    alice.call("group.send_file", {"group": ref(alice), "path": str(timed),
                                   "caption": "a wombat caption"})  # fmt: skip
    file_text = "[file] wombat.txt\na wombat caption"
    aid = {}
    for p in (bob, carol):
        p.wait_for(lambda p=p: find(p, "text", secret), f"{p.name}: the message", T)
        got = p.wait_for(lambda p=p: find(p, "text", file_text), f"{p.name}: the file", T)
        aid[p.name] = got["attachment_id"]
        wait_state(p, aid[p.name], "complete")
        p.call("group.read", {"group": ref(p)})  # an incoming message's deadline runs from here
    for p in (alice, bob, carol):
        p.wait_for(lambda p=p: find(p, "text", secret) is None, f"{p.name}: erased", T)
        p.wait_for(lambda p=p: find(p, "text", file_text) is None, f"{p.name}: file gone", T)
        assert found(p, "quokka") == [] and found(p, "wombat") == []
        if p.name in aid:
            with pytest.raises(RpcCallError):
                p.call("attachments.get", {"attachment_id": aid[p.name]})
            assert not any(e["data"].get("attachment_id") == aid[p.name] for e in p.events())
            assert not (p.home / "attachments" / f"{aid[p.name]}.blocks").exists()
        assert any(e["data"].get("group") == ref(p) for e in p.events(types=["message.expired"]))
        p.wait_for(lambda p=p: secret.encode() not in plain_pages(p)
                   and b"a wombat caption" not in plain_pages(p), f"{p.name}: pages", T)
    assert b"edited zeppelin" in plain_pages(bob)  # the pages were read right


def test_a_forged_edit_is_refused_and_an_early_edit_waits_for_its_message(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """carol, hostile, sends bob an edit of alice's message naming alice as its author (bob
    refuses: an edit is only ever the sender's own), then an edit of her own text before the
    text itself (reordered delivery: bob holds the edit and applies it when the text comes);
    deletions of alice's message refused; once removed, her reaction dropped."""
    alice, bob, carol = three_member_group(peers)
    sent = alice.call("group.send", {"group": ref(alice), "text": "alice wrote this"})
    mine = f"{key_of(alice)}:{sent['message_id']}"
    bob.wait_for(lambda: find(bob, "message_id", mine), "bob to get it", T)
    gid, version = group_id_of(carol), bob.call("group.get", {"group": ref(bob)})["version"]
    carol_hex = key_of(carol)
    alice_key, carol_key = bytes.fromhex(key_of(alice)), bytes.fromhex(carol_hex)
    now = int(time.time() * 1000)
    forged = wire.GroupActionPayload(gid, version, alice_key, wire.EditPayload(
        bytes.fromhex(sent["message_id"]), now, "carol's words"))  # fmt: skip
    own_id = os.urandom(16)
    early = wire.GroupActionPayload(gid, version, carol_key,
                                    wire.EditPayload(own_id, now + 1, "carol's second thought"))
    text = wire.GroupMessagePayload(gid, version, own_id, now, "carol's first thought")
    target = bytes.fromhex(sent["message_id"])
    # deletions of alice's message: naming alice (refused), naming herself (no such message
    # of hers: held, never applied)
    deletes = [wire.GroupActionPayload(gid, version, key, wire.DeletePayload(target))
               for key in (alice_key, carol_key)]  # fmt: skip
    carol.stop()
    with hostile(carol.home, "bob") as h:
        blocks = [b for p in (forged, *deletes, early, text) for b in h.payload_blocks(p)]
        h.deposit(url_of(relay_proc), blocks)
        bob.wait_for(lambda: queued(relay_proc, h) == 0, "bob to take carol's", T)
    late = f"{carol_hex}:{own_id.hex()}"
    got = bob.wait_for(lambda: find(bob, "message_id", late), "carol's text", T)
    assert got["text"] == "carol's second thought" and got["edits"] == 1
    kept = find(bob, "message_id", mine)
    assert kept is not None and kept["text"] == "alice wrote this" and kept["edits"] == 0
    edits = [e["data"] for e in bob.events(types=["message.edited"])]
    assert [e["message_id"] for e in edits] == [late]
    assert kept["deleted"] is False and bob.events(types=["message.deleted"]) == []

    # carol changes the group's timer 13 times in a row (60 s and 120 s by turns, then off):
    # bob's one line of hers follows every change (the history never lies), her events stop
    # at 10; alice's change after hers still has its line and its event
    now = int(time.time() * 1000)
    zero = bytes(wire.ED25519_LEN)
    timers = [wire.GroupActionPayload(gid, version, zero, wire.TimerPayload(now + i, secs))
              for i, secs in enumerate([60, 120] * 6 + [0])]  # fmt: skip
    with hostile(carol.home, "bob") as h:
        h.deposit(url_of(relay_proc), [b for p in timers for b in h.payload_blocks(p)])
    bob.wait_for(lambda: bob.call("conversations.get_timer", {"group": ref(bob)})["changed_at"]
                 == now + 12, "carol's last timer change", T)  # fmt: skip
    assert bob.call("conversations.get_timer", {"group": ref(bob)})["seconds"] == 0
    lines = [m for m in history(bob) if "timer_change" in m]
    assert [(m["text"], m["from"]) for m in lines] == [("[timer] off", carol_hex)]
    assert len(bob.events(types=["conversation.timer"])) == 10
    alice.call("conversations.set_timer", {"group": ref(alice), "seconds": 3600})
    bob.wait_for(lambda: [m["text"] for m in history(bob) if "timer_change" in m]
                 == ["[timer] off", "[timer] 1 hour"], "alice's timer line", T)  # fmt: skip
    last = bob.events(types=["conversation.timer"])[-1]["data"]
    assert last["by"] == key_of(alice) and last["seconds"] == 3600

    # held actions are bounded per sender (16, her own oldest go): carol's early edit of her
    # next text is pushed out by 16 reactions to messages that never come; and a reaction of
    # hers held for a message of alice's that comes once carol is removed is dropped then
    own_next, alices_next = os.urandom(16), os.urandom(16)
    held = [wire.GroupActionPayload(gid, version, carol_key,
                                    wire.EditPayload(own_next, now + 5, "pushed out"))]
    held += [wire.GroupActionPayload(gid, version, carol_key, wire.ReactionPayload(
        os.urandom(16), "\U0001f44d")) for _ in range(16)]  # fmt: skip
    held.append(wire.GroupActionPayload(gid, version, alice_key, wire.ReactionPayload(
        alices_next, "\U0001f389")))  # fmt: skip
    later = wire.GroupMessagePayload(gid, version, own_next, now + 6, "carol's later text")
    with hostile(carol.home, "bob") as h:
        h.deposit(url_of(relay_proc), [b for p in (*held, later) for b in h.payload_blocks(p)])
    got = bob.wait_for(lambda: find(bob, "message_id", f"{carol_hex}:{own_next.hex()}"),
                       "carol's later text", T)  # fmt: skip
    assert got["text"] == "carol's later text" and got["edits"] == 0

    # removed, carol's actions are dropped like her texts (§25.6): a reaction, then a text
    # of hers to bob alone (one-to-one: shown), which tells that the reaction was handled
    alice.call("group.remove", {"group": ref(alice), "member": carol_hex})
    bob.wait_for(lambda: carol_hex not in members(bob), "carol's removal at bob", T)
    after = bob.call("group.get", {"group": ref(bob)})["version"]
    reaction = wire.GroupActionPayload(gid, after, alice_key, wire.ReactionPayload(
        target, "\U0001f44d"))  # fmt: skip
    marker = wire.TextPayload(os.urandom(16), int(time.time() * 1000), "after the reaction")
    with hostile(carol.home, "bob") as h:
        h.deposit(url_of(relay_proc), h.payload_blocks(reaction) + h.payload_blocks(marker))
    bob.wait_for(lambda: any(m["text"] == "after the reaction" for m in bob.call(
        "messages.history", {"contact": "carol"})["messages"]), "carol's text", T)  # fmt: skip
    assert find(bob, "message_id", mine)["reactions"] == []  # type: ignore[index]
    assert bob.events(types=["message.reaction"]) == []

    # alice's message that carol's held reaction named arrives now: bob judges carol again
    # (removed) and drops it
    awaited = f"{key_of(alice)}:{alices_next.hex()}"
    alice.stop()
    alice_text = wire.GroupMessagePayload(gid, after, alices_next, int(time.time() * 1000),
                                          "alice's awaited text")  # fmt: skip
    with hostile(alice.home, "bob") as h:
        h.deposit(url_of(relay_proc), h.payload_blocks(alice_text))
    got = bob.wait_for(lambda: find(bob, "message_id", awaited), "alice's awaited text", T)
    assert got["reactions"] == [] and bob.events(types=["message.reaction"]) == []


def test_a_member_added_later_gets_the_timer_and_receipts_go_with_their_message(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """alice and bob: bob's reaction replaced, then removed; a receipt's event names its group
    and goes with a message deleted for everyone. alice sets a timer, then adds carol (who
    has no session with bob: introduced): carol gets the timer in force, and her copy of the
    next message takes it (and so does her group.message event, for the bridge's expiry). A
    file under a one-second timer reaches both although its upload outlasts the timer."""
    alice, bob = peers("alice"), peers("bob")
    connect(bob, alice)
    g = alice.call("group.create", {"name": NAME})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    bob.call("group.accept", {"invitation": invited(bob)})
    bob.wait_for(lambda: key_of(bob) in members(bob), "bob's add", T)
    alice.wait_for(lambda: len(members(alice)) == 2, "alice to see bob", T)
    a_key = key_of(alice)

    # a reaction replaced, then removed: alice sees each, and ends with none
    sent = alice.call("group.send", {"group": g, "text": "react to this"})["message_id"]
    at_bob = f"{a_key}:{sent}"
    bob.wait_for(lambda: find(bob, "message_id", at_bob), "bob to get it", T)
    for emoji, shown in (("\U0001f44d", "\U0001f44d"), ("\U0001f389", "\U0001f389"), ("", None)):
        bob.call("messages.react", {"group": ref(bob), "message_id": at_bob, "emoji": emoji})
        want = [] if shown is None else [{"emoji": shown, "count": 1, "mine": False}]
        alice.wait_for(lambda w=want: find(alice, "message_id", sent)["reactions"] == w,  # type: ignore[index]
                       f"alice: bob's reaction {shown}", T)  # fmt: skip
    assert [e["data"]["emoji"] for e in alice.events(types=["message.reaction"])] == [
        "\U0001f44d", "\U0001f389", None]  # fmt: skip

    # bob's delivery receipt: its event names the group, and goes when alice deletes it
    alice.wait_for(lambda: any(e["data"] == {"group": g, "message_id": sent, "status": "delivered"}
                               for e in alice.events(types=["group.receipt"])),
                   "the receipt's event", T)  # fmt: skip
    alice.call("messages.delete", {"group": g, "message_id": sent, "for_everyone": True})
    assert alice.events(types=["group.receipt"]) == []

    # a timer, then carol: she gets it from alice with her add
    alice.call("conversations.set_timer", {"group": g, "seconds": 300})
    bob.wait_for(lambda: bob.call("conversations.get_timer", {"group": ref(bob)})["seconds"]
                 == 300, "bob: the timer", T)  # fmt: skip
    carol = peers("carol")
    connect(carol, alice)
    alice.call("group.invite", {"group": g, "contact": "carol"})
    carol.call("group.accept", {"invitation": invited(carol)})
    for p in (alice, bob, carol):
        p.wait_for(lambda p=p: len(members(p)) == 3, f"{p.name} to see three members", T)
    carol.wait_for(lambda: carol.call("conversations.get_timer", {"group": ref(carol)})[
        "seconds"] == 300, "carol: the timer", T)  # fmt: skip
    alice.call("group.send", {"group": g, "text": "timed text"})
    for p in (bob, carol):
        got = p.wait_for(lambda p=p: find(p, "text", "timed text"), f"{p.name}: timed text", T)
        assert got["timer"] == 300, p.name
        event = next(e["data"] for e in p.events(types=["group.message"])
                     if e["data"]["text"] == "timed text")  # fmt: skip
        assert event["timer"] == 300, p.name
    # read, carol's copy gets its deadline
    carol.call("group.read", {"group": ref(carol)})
    assert find(carol, "text", "timed text")["expires_at"] is not None  # type: ignore[index]

    # a one-second timer and a file of some size: alice's copies take longer than that to
    # go up, and her own copy waits for them past its deadline (not cut off), then goes
    alice.call("conversations.set_timer", {"group": g, "seconds": 1})
    for p in (bob, carol):
        p.wait_for(lambda p=p: p.call("conversations.get_timer", {"group": ref(p)})["seconds"]
                   == 1, f"{p.name}: the short timer", T)  # fmt: skip
    big = tmp_short / "slow.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    alice.call("group.send_file", {"group": g, "path": str(big)})
    for p in (bob, carol):
        got = p.wait_for(lambda p=p: find(p, "text", "[file] slow.bin"), f"{p.name}: file", T)
        wait_state(p, got["attachment_id"], "complete")
    alice.wait_for(lambda: find(alice, "text", "[file] slow.bin") is None, "alice: erased", T)
