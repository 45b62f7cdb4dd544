"""A file reaches every device of a person (docs/devices.md §8, docs/protocol.md §22.5): a real
relay, three daemons (Alice on A1 and A2, linked with devices.link, and Bob). Bob uploads the
file once and sends the same descriptor to each of Alice's devices; each fetches and verifies
it, and neither deletes the blobs while Alice's list names the other. Once A2 is removed, A1
is Alice's only device and deletes a file's blobs as soon as it verified them (as a one-device
profile always did: tests/functional/test_attachments.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_attachments import blob_sizes, wait_state
from tests.functional.test_devices_fanout import (
    _delete_contact_mailbox,
    _devices_events,
    _link,
    _status_events,
    _wait_two_devices,
)
from tests.relay.conftest import RelayProcess


def _send(bob: Peer, src: Path) -> tuple[str, int]:
    sent = bob.call("attachments.send", {"contact": "alice", "path": str(src)})
    wait_state(bob, sent["attachment_id"], "uploaded")
    return sent["attachment_id"], sent["blocks"]


def _saved(peer: Peer, aid: str, target: Path) -> bytes:
    peer.call("attachments.save", {"attachment_id": aid, "path": str(target)})
    return target.read_bytes()


def test_a_file_reaches_both_devices(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a2 = peers("alice2")
    _link(a1, a2)
    a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"], "bob's session",
                T_DEVICE)  # fmt: skip
    _wait_two_devices(bob)

    # A2 away: A1 fetches and verifies first, and must leave the blobs for A2.
    a2.stop()
    data = os.urandom(300_000)
    src = tmp_short / "photo.jpg"
    src.write_bytes(data)
    aid, blocks = _send(bob, src)
    assert len(blob_sizes(relay_proc)) == blocks  # one upload for both devices
    wait_state(a1, aid, "complete")
    out = tmp_short / "out"
    out.mkdir()
    assert _saved(a1, aid, out / "a1.jpg") == data
    assert len(blob_sizes(relay_proc)) == blocks  # A1 verified it and kept them at the relay

    # A2 comes back: the same descriptor (same attachment id) waited in its mailbox; it fetches
    # the same blobs, which are still there, and gets the same bytes.
    a2.start()
    wait_state(a2, aid, "complete", 120)
    fetched = [e["data"]["done"] for e in a2.events(types=["attachment.progress"])
               if e["data"]["attachment_id"] == aid and e["data"]["direction"] == "in"]  # fmt: skip
    assert fetched and fetched[-1] == blocks  # A2 fetched every block itself
    got = _saved(a2, aid, out / "a2.jpg")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest() and got == data
    shown = [a2.call("attachments.get", {"attachment_id": aid}),
             a1.call("attachments.get", {"attachment_id": aid})]  # fmt: skip
    for a in shown:
        assert (a["state"], a["direction"], a["name"], a["size"], a["done"]) == (
            "complete", "in", "photo.jpg", len(data), blocks)  # fmt: skip
    assert len(blob_sizes(relay_proc)) == blocks  # A2 did not delete them either

    # A1 removes A2: A1 is Alice's only device again, and deletes a new file's blobs at once.
    a2_id = next(d["id"] for d in a2.call("devices.list")["devices"] if d["this_device"])
    a1.call("devices.remove", {"id": a2_id})
    bob.wait_for(lambda: _devices_events(bob)[-1]["devices"] == 1, "the removal")
    src2 = tmp_short / "notes.txt"
    src2.write_bytes(b"only one device now\n" * 50)
    aid2, _ = _send(bob, src2)
    wait_state(a1, aid2, "complete")
    a1.wait_for(lambda: len(blob_sizes(relay_proc)) == blocks, "the second file's blobs deleted")
    assert _saved(a1, aid2, out / "notes.txt") == src2.read_bytes()


def test_a_refused_device_copy_of_a_file(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """Bob's descriptor for A2 is refused (A2's mailbox for him is gone, docs/devices.md §5.4):
    A1 gets the file, Bob's send is not failed, his spool goes, nothing is uploaded again, and
    A1, with A2 still listed, leaves the blobs at the relay."""
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a2 = peers("alice2")
    _link(a1, a2)
    a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"], "bob's session",
                T_DEVICE)  # fmt: skip
    _wait_two_devices(bob)
    a2.stop()
    _delete_contact_mailbox(a2, "bob")
    src = tmp_short / "report.pdf"
    data = os.urandom(50_000)
    src.write_bytes(data)
    aid, blocks = _send(bob, src)
    wait_state(a1, aid, "complete")
    out = tmp_short / "a1.pdf"
    assert _saved(a1, aid, out) == data
    bob.wait_for(lambda: "sent" in _status_events(bob, aid), "sent")
    assert "failed" not in _status_events(bob, aid)
    assert bob.call("attachments.get", {"attachment_id": aid})["state"] == "uploaded"
    assert not (bob.home / "attachments" / f"{aid}.blocks").exists()  # the spool went
    assert len(blob_sizes(relay_proc)) == blocks  # one upload; A1 kept them for A2
