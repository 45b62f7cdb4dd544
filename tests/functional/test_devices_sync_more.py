"""Sync between one's own devices, beyond texts (docs/devices.md §6, payloads 0x48 and 0x49):
a real relay and three daemons (Alice on A1 and A2, Bob), set up as test_devices_sync.py's.
A reply, a reaction, an edit, a deletion for everyone, a timer change and a file made on A1
show on A2 as ours (A2 fetches the file's bytes from the relay); a settings change on A1
shows on A2; one from a removed device changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from tests.functional.conftest import T_DEVICE, Peer
from tests.functional.test_attachments import wait_state as file_state
from tests.functional.test_devices import texts
from tests.functional.test_devices_sync import _history, _linked, _sync_events, _this_id


def _message(peer: Peer, contact: str, message_id: str) -> dict[str, Any] | None:
    return next((m for m in _history(peer, contact) if m["message_id"] == message_id), None)


def _by_self(peer: Peer, kind: str, message_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in peer.events(types=[kind])
            if e["data"]["message_id"] == message_id and e["data"].get("by") == "self"]  # fmt: skip


def test_actions_timers_and_files_made_on_one_device_show_on_the_other(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    a1, a2, bob = _linked(peers)
    # Bob writes; A1 replies quoting it: A2 shows the reply as ours, quote and all.
    bob.call("messages.send", {"contact": "alice", "text": "lunch?"})
    for device in (a1, a2):
        device.wait_for(lambda d=device: ("in", "lunch?") in texts(d, "bob"), "bob's text")
    lunch = next(m for m in _history(a1, "bob") if m["text"] == "lunch?")["message_id"]
    reply = a1.call("messages.reply", {"contact": "bob", "message_id": lunch, "text": "yes"})
    got = a2.wait_for(lambda: _message(a2, "bob", reply["message_id"]), "the reply on A2")
    assert got["direction"] == "out" and got["text"] == "yes"
    assert got["reply_to"] == {"message_id": lunch, "text": "lunch?"}
    bob.wait_for(lambda: ("in", "yes") in texts(bob, "alice"), "the reply at bob")

    # A1 reacts to Bob's text: A2 shows our reaction.
    a1.call("messages.react", {"message_id": lunch, "emoji": "👍"})
    a2.wait_for(lambda: (m := _message(a2, "bob", lunch)) and m["reactions"] == [
        {"emoji": "👍", "count": 1, "mine": True}], "the reaction on A2")  # fmt: skip
    assert _by_self(a2, "message.reaction", lunch)[-1]["emoji"] == "👍"

    # A1 edits its reply: A2 shows the edit; then deletes it for everyone: gone on A2.
    a1.call("messages.edit", {"message_id": reply["message_id"], "text": "yes, at noon"})
    a2.wait_for(lambda: (m := _message(a2, "bob", reply["message_id"])) and
                m["text"] == "yes, at noon" and m["edits"] == 1, "the edit on A2")  # fmt: skip
    assert _by_self(a2, "message.edited", reply["message_id"])
    bob.wait_for(lambda: ("in", "yes, at noon") in texts(bob, "alice"), "the edit at bob")
    a1.call("messages.delete", {"message_id": reply["message_id"], "for_everyone": True})
    a2.wait_for(lambda: (m := _message(a2, "bob", reply["message_id"])) and m["deleted"],
                "the deletion on A2")  # fmt: skip
    assert (_message(a2, "bob", reply["message_id"]) or {}).get("text") == ""
    # Its events are gone with its text (the deletion's own is what remains).
    assert _by_self(a2, "message.deleted", reply["message_id"])
    assert not _by_self(a2, "message.edited", reply["message_id"])

    # A1 sets the conversation's timer: A2 has it, as set by us.
    a1.call("conversations.set_timer", {"contact": "bob", "seconds": 3600})
    a2.wait_for(lambda: a2.call("conversations.get_timer", {"contact": "bob"})["seconds"]
                == 3600, "the timer on A2")  # fmt: skip
    assert [e["data"]["by"] for e in a2.events(types=["conversation.timer"])] == ["self"]
    bob.wait_for(lambda: bob.call("conversations.get_timer", {"contact": "alice"})["seconds"]
                 == 3600, "the timer at bob")  # fmt: skip
    a1.call("conversations.set_timer", {"contact": "bob", "seconds": 0})
    a2.wait_for(lambda: a2.call("conversations.get_timer", {"contact": "bob"})["seconds"] == 0,
                "the timer off on A2")  # fmt: skip

    # A1 sends a file while A2 is stopped: A2, started once Bob fetched and verified it,
    # shows it as sent by us and fetches its bytes from the relay (Bob, a single device,
    # left the blobs there: Alice lists two devices, §22.5 step 4).
    a2.stop()
    data = bytes(range(256)) * 300
    src = tmp_short / "notes.bin"
    src.write_bytes(data)
    aid = a1.call("attachments.send", {"contact": "bob", "path": str(src),
                                       "caption": "the notes"})["attachment_id"]  # fmt: skip
    file_state(bob, aid, "complete")
    bob.stop()  # its deletion, had it made one, is done
    a2.start()
    done = file_state(a2, aid, "complete")
    assert done["direction"] == "out" and done["name"] == "notes.bin"
    assert done["caption"] == "the notes"
    shown = _message(a2, "bob", aid)
    assert shown is not None and shown["direction"] == "out"
    saved = a2.call("attachments.save", {"attachment_id": aid, "path": str(tmp_short / "a2.bin")})
    assert saved["size"] == len(data) and (tmp_short / "a2.bin").read_bytes() == data
    assert [e["data"]["message_id"] for e in a2.events(types=["message.transcript"])
            if e["data"]["message_id"] == aid] == [aid]  # fmt: skip
    # Nothing was made twice on A1 by an echo.
    assert [m["message_id"] for m in _history(a1, "bob")].count(aid) == 1
    # A2's copy outlives a restart (not an orphan spool for the unlock to delete).
    a2.stop()
    a2.start()
    again = a2.call("attachments.save", {"attachment_id": aid,
                                         "path": str(tmp_short / "a2-again.bin")})  # fmt: skip
    assert again["size"] == len(data) and (tmp_short / "a2-again.bin").read_bytes() == data


def test_edits_and_deletions_made_at_once_all_show_on_the_other(
    peers: Callable[[str], Peer],
) -> None:
    # Each text edited or deleted right after it was sent: on A2 its action comes after it
    # (the sync deposits keep their order), or waits for it.
    a1, a2, _bob = _linked(peers)
    sent = [a1.call("messages.send", {"contact": "bob", "text": f"draft {i}"})["message_id"]
            for i in range(8)]  # fmt: skip
    deleted = set(sent[3::4])
    for i, mid in enumerate(sent):
        if mid in deleted:
            a1.call("messages.delete", {"message_id": mid, "for_everyone": True})
        else:
            a1.call("messages.edit", {"message_id": mid, "text": f"final {i}"})

    def applied() -> bool:
        done = {e["data"]["message_id"] for e in a2.events(types=["message.edited",
                                                                   "message.deleted"])}
        return done >= set(sent)

    a2.wait_for(applied, "every edit and deletion on A2", T_DEVICE)
    shown = {m["message_id"]: m for m in _history(a2, "bob")}
    for i, mid in enumerate(sent):
        if mid in deleted:
            assert shown[mid]["deleted"], i
        else:
            assert shown[mid]["text"] == f"final {i}" and not shown[mid]["deleted"], i


def test_a_setting_changed_on_one_device_keeps_those_chosen_on_the_other(
    peers: Callable[[str], Peer],
) -> None:
    # A1 chose its level before the link ("off": cover traffic would slow the test down; a
    # level chosen is not the default, which the relay's place decides): A2 gets it with the
    # profile, and A2's name change (a setting A2 never had the level's clock for) leaves it.
    a1, a2, _bob = _linked(peers, level="off")
    chosen = {"level": "off", "level_chosen": True}
    assert {k: a2.call("privacy.get")[k] for k in chosen} == chosen
    a2.call("identity.set_name", {"display_name": "Alice Laptop"})
    a1.wait_for(lambda: a1.call("identity.get")["display_name"] == "Alice Laptop",
                "the name on A1")  # fmt: skip
    assert {k: a1.call("privacy.get")[k] for k in chosen} == chosen
    # Two devices changing two settings: each keeps the other's.
    a1.call("settings.set", {"read_receipts": False})
    a2.call("settings.set", {"disappearing_default": 3600})
    for device in (a1, a2):
        device.wait_for(lambda d=device: d.call("settings.get")["disappearing_default"] == 3600
                        and d.call("settings.get")["read_receipts"] is False,
                        "both changes")  # fmt: skip
        assert {k: device.call("privacy.get")[k] for k in chosen} == chosen
        assert device.call("identity.get")["display_name"] == "Alice Laptop"


def test_settings_follow_and_a_removed_device_changes_none(
    peers: Callable[[str], Peer],
) -> None:
    a1, a2, _bob = _linked(peers)
    a1.call("identity.set_name", {"display_name": "Alice Desk"})
    a1.call("privacy.set", {"level": "strong"})
    a1.call("settings.set", {"read_receipts": False, "disappearing_default": 86400})
    a2.wait_for(lambda: a2.call("settings.get")["disappearing_default"] == 86400,
                "the settings on A2")  # fmt: skip
    assert a2.call("identity.get")["display_name"] == "Alice Desk"
    assert a2.call("privacy.get")["level"] == "strong"
    assert a2.call("settings.get")["read_receipts"] is False
    assert a2.events(types=["settings.synced"])[-1]["data"] == {
        "display_name": "Alice Desk", "privacy_level": "strong", "read_receipts": False,
        "disappearing_default": 86400}  # fmt: skip
    # A refused call writes nothing and syncs nothing (every parameter checked first).
    with pytest.raises(RpcCallError):
        a1.call("settings.set", {"read_receipts": True, "receipt_delay_max": 0.1})
    assert a1.call("settings.get")["read_receipts"] is False
    # A device's own settings stay its own.
    a1.call("settings.set", {"receipt_delay_max": 0.5})
    # And back the other way: A2's change shows on A1.
    a2.call("identity.set_name", {"display_name": "Alice Laptop"})
    a1.wait_for(lambda: a1.call("identity.get")["display_name"] == "Alice Laptop",
                "the name on A1")  # fmt: skip
    assert a1.call("privacy.get")["level"] == "strong"
    assert a2.call("settings.get")["receipt_delay_max"] != 0.5

    # A2 removed: A1 deleted its sync mailbox for A2, so A2's later change is refused by the
    # relay (A2 says so: `devices.sync` `gone`, for A1) and A1 keeps its settings.
    a2_id, a1_id = _this_id(a2), _this_id(a1)
    a1.call("devices.remove", {"id": a2_id})
    a2.call("identity.set_name", {"display_name": "Removed Laptop"})
    a2.wait_for(lambda: a1_id in {e["device"] for e in _sync_events(a2, "gone")},
                "the relay's refusal of A2's deposit", T_DEVICE)  # fmt: skip
    assert a1.call("identity.get")["display_name"] == "Alice Laptop"
    assert len(a1.events(types=["settings.synced"])) == 1
