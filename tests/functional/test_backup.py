"""Encrypted backups end to end: export from one daemon, import into a fresh profile under a
new daemon, and the session renewal with every contact through the real relay
(docs/backup.md, docs/protocol.md §23)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import backup as fmt
from tests.functional.conftest import Peer, connect

PASS = "correct horse battery staple"
#: The format's minimum cost (19 MiB, 2 passes, 1 lane): where a test is about something else.
CHEAP = {"kdf_memory_kib": fmt.MIN_KDF.memory_kib, "kdf_passes": 2, "kdf_lanes": 1}


def texts(peer: Peer, contact: str) -> list[tuple[str, str]]:
    msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
    return [(m["direction"], m["text"]) for m in msgs]


def received(peer: Peer, contact: str, text: str) -> bool:
    return ("in", text) in texts(peer, contact)


def event_types(peer: Peer, types: list[str]) -> list[dict[str, Any]]:
    return peer.events(types=types)


def error_of(peer: Peer, method: str, params: dict[str, Any]) -> RpcCallError:
    with pytest.raises(RpcCallError) as info:
        peer.call(method, params)
    return info.value


def test_export_import_renews_every_contact(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(alice, bob)
    connect(alice, carol)
    alice.call("messages.send", {"contact": "bob", "text": "before the backup, bob"})
    bob.wait_for(lambda: received(bob, "alice", "before the backup, bob"), "alice's text")
    carol.call("messages.send", {"contact": "alice", "text": "before the backup, from carol"})
    alice.wait_for(lambda: received(alice, "carol", "before the backup, from carol"), "carol")
    alice.call("contacts.verify", {"name": "bob"})
    alice.call("settings.set", {"read_receipts": False})

    path = tmp_short / "alice.aegisbackup"
    out = alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    assert out["contacts"] == 2 and out["messages"] >= 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = path.read_bytes()
    assert raw.startswith(fmt.MAGIC)
    for secret in (b"before the backup", b"carol", PASS.encode()):
        assert secret not in raw
    # An existing file is not overwritten without force.
    err = error_of(alice, "backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    assert err.code == 1040 and path.read_bytes() == raw

    # The old device is lost; bob writes to it meanwhile: the text must not be lost.
    alice.stop()
    bob.call("messages.send", {"contact": "alice", "text": "while you were away"})
    bob.wait_for(
        lambda: (
            bob.call("messages.history", {"contact": "alice"})["messages"][-1]["status"] == "sent"
        ),
        "the deposit to the old device",
    )

    new = peers("alice2")
    new.wait_connected()
    result = new.call("backup.import", {"path": str(path), "passphrase": PASS})
    assert result == {"contacts": 2, "messages": out["messages"], "groups": 0, "renewing": 2}
    assert new.call("identity.get")["display_name"] == "alice"
    assert new.call("settings.get")["read_receipts"] is False
    contacts = {c["name"]: c for c in new.call("contacts.list")["contacts"]}
    assert set(contacts) == {"bob", "carol"} and contacts["bob"]["verified"]
    assert ("out", "before the backup, bob") in texts(new, "bob")
    assert ("in", "before the backup, from carol") in texts(new, "carol")
    # The same identity: the safety numbers did not change.
    assert (
        new.call("contacts.safety_number", {"name": "bob"})["safety_number"]
        == bob.call("contacts.safety_number", {"name": "alice"})["safety_number"]
    )

    for peer in (bob, carol, new):
        peer.wait_for(
            lambda p=peer: event_types(p, ["contact.session_renewed"]),
            "the renewed session",
        )
    renewed = {e["data"]["contact"] for e in event_types(new, ["contact.session_renewed"])}
    assert renewed == {"bob", "carol"}
    for peer in (bob, carol):  # "session renewed", not a new contact or a changed identity
        assert [c["name"] for c in peer.call("contacts.list")["contacts"]] == ["alice"]
        assert peer.call("requests.list")["requests"] == []
        assert not event_types(peer, ["contact.request"])

    # The text sent to the old device while it was away arrives, once.
    new.wait_for(lambda: received(new, "bob", "while you were away"), "the re-sent text")
    # Both directions with every contact.
    for name, peer in (("bob", bob), ("carol", carol)):
        new.call("messages.send", {"contact": name, "text": f"restored says hi to {name}"})
        peer.wait_for(lambda p=peer, n=name: received(p, "alice", f"restored says hi to {n}"),
                      f"{name} receives")  # fmt: skip
        peer.call("messages.send", {"contact": "alice", "text": f"{name} answers"})
        new.wait_for(lambda n=name: received(new, n, f"{n} answers"), f"{name}'s answer")
    assert texts(new, "bob").count(("in", "while you were away")) == 1
    assert new.call("backup.status") == {"renewals_pending": 0}

    # The old device comes back: it receives nothing more, and cannot reach bob.
    alice.start()
    bob.call("messages.send", {"contact": "alice", "text": "only for the restored device"})
    new.wait_for(lambda: received(new, "bob", "only for the restored device"), "the new text")
    # It learns that it was restored elsewhere, and refuses to send (test below).
    alice.wait_for(lambda: alice.call("status")["superseded"], "the old device's verdict")
    err = error_of(alice, "messages.send", {"contact": "bob", "text": "from the old device"})
    assert err.code == 1024
    assert not received(alice, "bob", "only for the restored device")
    assert not received(alice, "bob", "while you were away")
    assert not received(bob, "alice", "from the old device")


def test_bad_files_change_nothing(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    alice = peers("alice")
    alice.wait_connected()
    alice.call("identity.set_name", {"display_name": "Alice Backup"})
    path = tmp_short / "a.bak"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    raw = path.read_bytes()

    fresh = peers("fresh")
    before = fresh.call("identity.get")

    def refused(data: bytes, passphrase: str = PASS) -> RpcCallError:
        p = tmp_short / "case.bak"
        p.write_bytes(data)
        return error_of(fresh, "backup.import", {"path": str(p), "passphrase": passphrase})

    wrong = refused(raw, "not the right passphrase")
    assert (wrong.code, wrong.data["error"]) == (1043, "wrong_passphrase")
    header = bytearray(raw)
    header[len(fmt.MAGIC) + 20] ^= 0x01  # inside the salt
    assert refused(bytes(header)).code == 1043  # looks like a wrong passphrase (documented)
    body = bytearray(raw)
    body[-5] ^= 0x01
    damaged = refused(bytes(body))  # the only chunk: damaged, not "wrong passphrase"
    assert (damaged.code, damaged.data["error"]) == (1044, "damaged")
    assert refused(raw[:-1]).code == 1045
    assert refused(raw[: fmt.HEADER_LEN]).code == 1045
    assert refused(b"hello, world").code == 1042
    # Parameters below the minimum (a cheap-to-crack file) or absurd: refused before any work.
    for mem, passes, lanes in ((8 * 1024, 2, 1), (fmt.MIN_KDF.memory_kib, 1, 1),
                               (8 << 20, 3, 4), (64 * 1024, 3, 200)):  # fmt: skip
        low = bytearray(raw)
        low[len(fmt.MAGIC) + 2 : len(fmt.MAGIC) + 14] = (
            mem.to_bytes(4, "big") + passes.to_bytes(4, "big") + lanes.to_bytes(4, "big")
        )
        err = refused(bytes(low))
        assert err.code == 1042 and "refused" in err.message
    # Nothing changed.
    assert fresh.call("identity.get") == before
    assert fresh.call("contacts.list")["contacts"] == []
    assert not fresh.events(types=["backup.imported"])

    # Weak passphrases are refused, with the rule.
    for weak in ("short", "aaaaaaaaaaaaaaaaaaaa", "123456789012", "password1234", "Summer2024!!"):
        err = error_of(alice, "backup.export",
                       {"path": str(tmp_short / "w.bak"), "passphrase": weak, **CHEAP})  # fmt: skip
        assert err.code == 1041 and err.message.startswith("the passphrase is too weak")
        assert "10^12" in err.message  # the rule the profile's passphrase follows too
        assert weak not in err.message
    assert not (tmp_short / "w.bak").exists()

    # A profile with contacts or history is not fresh: import is refused.
    other = peers("other")
    connect(alice, other)
    err = error_of(alice, "backup.import", {"path": str(path), "passphrase": PASS})
    assert err.code == 1046


def test_default_parameters_and_progress(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    alice = peers("alice")
    path = tmp_short / "default.bak"
    out = alice.call("backup.export", {"path": str(path), "passphrase": PASS})
    assert out["kdf"] == {"memory_kib": 65536, "passes": 3, "lanes": 4}
    header = fmt.Header.from_bytes(path.read_bytes())
    assert header.kdf == fmt.DEFAULT_KDF
    stages = [e["data"]["stage"] for e in alice.events(types=["backup.progress"])]
    assert stages[0] == "kdf" and "encrypt" in stages and stages[-1] == "done"
    fresh = peers("fresh")
    assert fresh.call("backup.import", {"path": str(path), "passphrase": PASS})["contacts"] == 0
    assert fresh.call("identity.get")["identity_key"] == alice.call("identity.get")["identity_key"]


def test_cli_export_and_import(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    from tests.functional.test_cli_messaging import aegis, ok, one_line_error

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("messages.send", {"contact": "bob", "text": "kept in the backup"})
    pw = tmp_short / "pw"
    pw.write_text(PASS + "\n")
    weak = tmp_short / "weak"
    weak.write_text("letmein1\n")
    target = tmp_short / "cli.bak"
    cheap = ["--kdf-memory-kib", str(fmt.MIN_KDF.memory_kib), "--kdf-passes", "2",
             "--kdf-lanes", "1"]  # fmt: skip

    line = one_line_error(aegis(alice, "backup", "export", str(target),
                                "--passphrase-file", str(weak), *cheap))  # fmt: skip
    assert "too weak" in line and "10^12" in line and "letmein1" not in line
    assert not target.exists()
    out = ok(aegis(alice, "backup", "export", str(target), "--passphrase-file", str(pw), *cheap))
    assert out.startswith("backup written to ") and "1 contacts" in out and PASS not in out
    line = one_line_error(aegis(alice, "backup", "export", str(target), "--passphrase-file",
                                str(pw), *cheap))  # fmt: skip
    assert "exists" in line and "--force" in line
    ok(aegis(alice, "backup", "export", str(target), "--passphrase-file", str(pw), "--force",
             *cheap))  # fmt: skip
    # No passphrase file and no terminal: a clear error, nothing asked.
    line = one_line_error(aegis(alice, "backup", "export", str(tmp_short / "x.bak"), *cheap))
    assert "--passphrase-file" in line

    fresh = peers("fresh")
    res = json.loads(ok(aegis(fresh, "backup", "import", str(target), "--passphrase-file",
                              str(pw), "--json")))  # fmt: skip
    assert res["contacts"] == 1 and res["renewing"] == 1
    assert ("out", "kept in the backup") in texts(fresh, "bob")
    line = one_line_error(aegis(fresh, "backup", "import", str(target), "--passphrase-file",
                                str(pw)))  # fmt: skip
    assert "fresh profile" in line
    bob.wait_for(lambda: event_types(bob, ["contact.session_renewed"]), "the renewal")


def _deposit(url: str, address: Any, block: bytes) -> None:
    import asyncio

    from relay.client import RelayClient

    async def go() -> None:
        client = await RelayClient.connect(url)
        try:
            await client.deposit(address.deposit_id, block, address.send_token or None)
        finally:
            await client.close()

    asyncio.run(go())


def test_renewal_requests_cannot_be_replayed(
    peers: Callable[[str], Peer], tmp_short: Path, relay_proc: Any
) -> None:
    """Someone holding a renewal request (the relay) cannot make the contact renew again with
    an older one; a newer one (only the identity's holder can make it) is taken."""
    from aegisd.core import renewal, wire
    from aegisd.core.identity import IdentityKeyPair, PublicIdentity
    from aegisd.core.primitives import SystemEntropy

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    first = tmp_short / "first.bak"
    alice.call("backup.export", {"path": str(first), "passphrase": PASS, **CHEAP})
    alice.stop()
    new = peers("alice2")
    new.call("backup.import", {"path": str(first), "passphrase": PASS})
    bob.wait_for(lambda: event_types(bob, ["contact.session_renewed"]), "the renewal")
    new.wait_for(lambda: event_types(new, ["contact.session_renewed"]), "the renewal")

    # Where the restored profile now deposits for bob, and the identity: from a second backup.
    second = tmp_short / "second.bak"
    new.call("backup.export", {"path": str(second), "passphrase": PASS, **CHEAP})
    contents = fmt.BackupContents.from_bytes(fmt.decrypt(PASS, second.read_bytes()))
    ident = IdentityKeyPair.from_raw(contents.ed_priv, contents.x_priv, contents.binding_sig)
    (bob_entry,) = contents.contacts
    assert bob_entry.send_to is not None
    bob_identity = PublicIdentity.from_record(bob_entry.identity)
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    # A real bundle (the restored profile's): only the freshness check can stop a request.
    bundle = wire.ContactLink.from_text(new.call("address.get")["link"]).bundle_address

    def request(created_at_ms: int) -> bytes:
        payload = wire.RenewPayload(
            SystemEntropy().random(16), created_at_ms, bob_entry.send_to, bundle, "mallory"
        )
        return renewal.seal(SystemEntropy(), ident, bob_identity, wire.encode_payload(payload))

    now = time.time_ns() // 1_000_000
    for created in (now - 3_600_000, now - 20 * 24 * 3_600_000, now + 3 * 24 * 3_600_000):
        _deposit(url, bob_entry.send_to, request(created))  # older than the last, stale, future
    new.call("messages.send", {"contact": "bob", "text": "after the replays"})
    bob.wait_for(lambda: received(bob, "alice", "after the replays"), "the text after them")
    assert len(event_types(bob, ["contact.session_renewing"])) == 1  # the real one only
    bob.call("messages.send", {"contact": "alice", "text": "still the same session"})
    new.wait_for(lambda: received(new, "bob", "still the same session"), "bob's answer")

    # The control: a newer request is taken (bob starts a renewal towards its reply mailbox).
    _deposit(url, bob_entry.send_to, request(time.time_ns() // 1_000_000))
    bob.wait_for(
        lambda: len(event_types(bob, ["contact.session_renewing"])) == 2, "the newer request"
    )


def test_stale_backup_reports_instead_of_losing_the_contact(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """A backup older than a mailbox rotation the old device completed: the contact's mailbox
    in the backup is gone. The contact and its history stay; the failure is reported."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("messages.send", {"contact": "bob", "text": "history to keep"})
    bob.wait_for(lambda: received(bob, "alice", "history to keep"), "the text")
    path = tmp_short / "stale.bak"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    bob.call("contacts.rotate_mailbox", {"name": "alice"})
    bob.wait_for(lambda: event_types(bob, ["contact.mailbox_rotated"]), "the rotation")
    alice.stop()

    new = peers("alice2")
    new.call("backup.import", {"path": str(path), "passphrase": PASS})
    failed = new.wait_for(lambda: event_types(new, ["contact.renewal_failed"]), "the report")
    assert (
        failed[0]["data"]["contact"] == "bob"
        and "add the contact again" in (failed[0]["data"]["reason"])
    )
    (c,) = new.call("contacts.list")["contacts"]
    assert c["name"] == "bob" and "add the contact again" in c["failed"]  # visible until fixed
    assert new.call("status")["contacts_failed"] == ["bob"]
    assert ("out", "history to keep") in texts(new, "bob")
    assert new.call("backup.status") == {"renewals_pending": 0}
    assert not event_types(new, ["contact.failed"])


def test_a_blocked_contact_cannot_reach_the_old_device(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """A blocked contact is not renewed, but the old profile's mailboxes for it are retired all
    the same: its deposits to the old device are refused (the old device stops receiving)."""
    alice, dave = peers("alice"), peers("dave")
    connect(alice, dave)
    alice.call("contacts.block", {"name": "dave"})
    path = tmp_short / "blocked.bak"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    alice.stop()
    new = peers("alice2")
    assert new.call("backup.import", {"path": str(path), "passphrase": PASS})["renewing"] == 0
    assert new.call("contacts.list")["contacts"][0]["blocked"]

    def refused() -> bool:
        dave.call("messages.send", {"contact": "alice", "text": "are you there?"})
        time.sleep(0.5)
        history = dave.call("messages.history", {"contact": "alice"})["messages"]
        return any(m["status"] == "failed" for m in history)

    dave.wait_for(refused, "a deposit to the old device to be refused")


def test_renewal_request_not_replayed_into_a_contact_added_again(
    peers: Callable[[str], Peer], tmp_short: Path, relay_proc: Any
) -> None:
    """The replay bound is kept per contact: a request made before bob removed alice and added
    her again (its bound went with the old contact) must not renew the new contact."""
    from aegisd.core import renewal, wire
    from aegisd.core.identity import IdentityKeyPair, PublicIdentity
    from aegisd.core.primitives import SystemEntropy

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    before = time.time_ns() // 1_000_000 - 1000
    for peer, other in ((alice, "bob"), (bob, "alice")):
        peer.call("contacts.remove", {"name": other})
    connect(alice, bob)

    path = tmp_short / "again.bak"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    contents = fmt.BackupContents.from_bytes(fmt.decrypt(PASS, path.read_bytes()))
    ident = IdentityKeyPair.from_raw(contents.ed_priv, contents.x_priv, contents.binding_sig)
    (entry,) = contents.contacts
    assert entry.send_to is not None
    bundle = wire.ContactLink.from_text(alice.call("address.get")["link"]).bundle_address
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"

    def request(created_at_ms: int) -> bytes:
        payload = wire.RenewPayload(
            SystemEntropy().random(16), created_at_ms, entry.send_to, bundle, "alice"
        )
        return renewal.seal(
            SystemEntropy(), ident, PublicIdentity.from_record(entry.identity),
            wire.encode_payload(payload),
        )  # fmt: skip

    _deposit(url, entry.send_to, request(before))  # made before bob added alice again
    # Behind it in the same mailbox: a text in the current session, which bob can still open
    # only if the request did not replace the session.
    alice.call("messages.send", {"contact": "bob", "text": "after the old request"})
    bob.wait_for(lambda: received(bob, "alice", "after the old request"), "the text")
    assert not event_types(bob, ["contact.session_renewing"])
    # The control: the same request, made now, is taken.
    _deposit(url, entry.send_to, request(time.time_ns() // 1_000_000))
    bob.wait_for(lambda: event_types(bob, ["contact.session_renewing"]), "the newer request")
    # Nobody answers it: bob's contact stays "renewing" (not established). A backup made now
    # still holds the contact and its history.
    out = bob.call("backup.export", {"path": str(tmp_short / "bob.bak"), "passphrase": PASS,
                                     **CHEAP})  # fmt: skip
    assert out["contacts"] == 1 and out["messages"] >= 1


def test_old_device_after_restore_says_so(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    """Issue 14 item 9: the copy a backup was restored from learns it (its mailboxes are gone
    at the relay), says so in status and on send, stops retrying, and logs it once."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    path = tmp_short / "alice.aegisbackup"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    alice.stop()
    new = peers("alice2")
    new.wait_connected()
    new.call("backup.import", {"path": str(path), "passphrase": PASS})
    for peer in (bob, new):
        peer.wait_for(lambda p=peer: event_types(p, ["contact.session_renewed"]), "the renewal")
    new.wait_for(lambda: new.call("backup.status") == {"renewals_pending": 0}, "renewal done")
    assert new.call("status")["superseded"] is None

    alice.start()  # the old device comes back
    st = alice.wait_for(lambda: (s := alice.call("status"))["superseded"] and s, "the verdict")
    assert "restored from a backup on another device" in st["superseded"]
    assert event_types(alice, ["profile.superseded"])
    err = error_of(alice, "messages.send", {"contact": "bob", "text": "from the old device"})
    assert err.code == 1024 and err.data["reason"] == "restored_elsewhere"
    assert "use that device" in err.message
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "status", "--home", str(alice.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "WARNING: this profile was restored" in r.stdout, r.stdout
    # Restarted: still known, and nothing repeats in the log.
    alice.stop()
    assert alice.proc is not None
    first_log = alice.proc.stderr()
    assert first_log.count("restored on another device") == 1, first_log
    alice.start()
    alice.wait_connected()
    assert alice.call("status")["superseded"]
    err = error_of(alice, "messages.send", {"contact": "bob", "text": "again"})
    assert err.data["reason"] == "restored_elsewhere"
    alice.stop()
    log = alice.proc.stderr()
    assert "refused" not in log and "restored on another device" not in log, log
    # The restored device is unaffected.
    new.call("messages.send", {"contact": "bob", "text": "from the restored device"})
    bob.wait_for(lambda: received(bob, "alice", "from the restored device"), "the new device")


def test_old_device_still_running_learns_it_on_its_next_send(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """The old device stays up while the backup is restored elsewhere: its next send is refused
    by the contact's relay, and that makes it ask about its own address (gone): superseded."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    path = tmp_short / "alice.aegisbackup"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    new = peers("alice2")
    new.wait_connected()
    new.call("backup.import", {"path": str(path), "passphrase": PASS})
    new.wait_for(lambda: new.call("backup.status") == {"renewals_pending": 0}, "renewal done")
    new.wait_for(lambda: bob.call("backup.status") == {"renewals_pending": 0}, "bob's side")
    sent = alice.call("messages.send", {"contact": "bob", "text": "from the old device"})
    alice.wait_for(lambda: alice.call("status")["superseded"], "the verdict")
    msgs = alice.call("messages.history", {"contact": "bob"})["messages"]
    assert [m["status"] for m in msgs if m["message_id"] == sent["message_id"]] == ["failed"]
    assert error_of(alice, "messages.send", {"contact": "bob", "text": "x"}).code == 1024
    assert not received(bob, "alice", "from the old device")


def test_renewal_sends_again_the_reactions_edits_deletions_and_replies(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """What bob did after alice's backup, deposited to her lost device, reaches the restored
    one, rebuilt from bob's store (docs/protocol.md §23, §26): the backup has none of it."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    hers = alice.call("messages.send", {"contact": "bob", "text": "alice's words"})["message_id"]
    edited = bob.call("messages.send", {"contact": "alice", "text": "bob's draft"})["message_id"]
    gone = bob.call("messages.send", {"contact": "alice", "text": "bob's regret"})["message_id"]

    def one(peer: Peer, contact: str, mid: str) -> dict[str, Any] | None:
        msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
        return next((m for m in msgs if m["message_id"] == mid), None)

    for mid in (edited, gone):
        alice.wait_for(lambda x=mid: one(alice, "bob", x), "bob's texts")
    bob.wait_for(lambda: one(bob, "alice", hers), "alice's text")
    bob.wait_for(lambda: one(bob, "alice", edited)["status"] == "delivered", "the receipt")  # type: ignore[index]
    path = tmp_short / "alice.aegisbackup"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    alice.stop()
    bob.call("messages.react", {"message_id": hers, "emoji": "🩷"})
    # A reaction stored under the looser rule before (§26.2 now refuses a run of emoji): not
    # sent again, and the rest of the renewal goes on.
    from tests.functional.test_message_actions import offline_store

    s = offline_store(bob)
    try:
        with s.transaction():
            s._q("INSERT INTO reactions (message_id, direction, emoji, created_at) "
                 "VALUES (?, 'out', '😀😀', 1)", (edited,))  # fmt: skip
    finally:
        s.close()
    bob.call("messages.edit", {"message_id": edited, "text": "bob's final text"})
    bob.call("messages.delete", {"message_id": gone, "for_everyone": True})
    reply = bob.call("messages.reply", {"contact": "alice", "message_id": hers,
                                        "text": "answering you"})["message_id"]  # fmt: skip

    new = peers("alice2")
    new.wait_connected()
    new.call("backup.import", {"path": str(path), "passphrase": PASS})
    got = new.wait_for(lambda: one(new, "bob", reply), "the re-sent reply")
    assert got["reply_to"] == {"message_id": hers, "text": "alice's words"}
    new.wait_for(lambda: one(new, "bob", edited)["edits"] == 1, "the re-sent edit")  # type: ignore[index]
    assert one(new, "bob", edited)["text"] == "bob's final text"  # type: ignore[index]
    new.wait_for(lambda: one(new, "bob", gone)["deleted"], "the re-sent deletion")  # type: ignore[index]
    new.wait_for(lambda: one(new, "bob", hers)["reactions"], "the re-sent reaction")  # type: ignore[index]
    assert one(new, "bob", hers)["reactions"] == [{"emoji": "🩷", "count": 1, "mine": False}]  # type: ignore[index]
    assert one(new, "bob", edited)["reactions"] == []  # type: ignore[index]
    assert "bob's regret" not in json.dumps(new.events())


def test_the_file_carries_replies_edits_deletions_and_reactions(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """Backup version 4 and later (docs/backup.md §2 "Extras"): the restored history has the
    quotes, edit marks, deletion marks and reactions of both sides, restored from the file
    alone (the contact is stopped: nothing is sent again by a renewal). A quote of a message with a
    disappearing timer stays out of the file, with the timed message; so does a reaction the
    present rule refuses."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)

    def one(peer: Peer, mid: str) -> dict[str, Any] | None:
        msgs = peer.call("messages.history", {"contact": "bob", "limit": 500})["messages"]
        return next((m for m in msgs if m["message_id"] == mid), None)

    his = bob.call("messages.send", {"contact": "alice", "text": "bob says hi"})["message_id"]
    draft = bob.call("messages.send", {"contact": "alice", "text": "bob draft"})["message_id"]
    alice.wait_for(lambda: one(alice, draft), "bob's texts")
    answer = alice.call("messages.reply", {"contact": "bob", "message_id": his,
                                           "text": "alice answers"})["message_id"]  # fmt: skip
    typo = alice.call("messages.send", {"contact": "bob", "text": "alice typo"})["message_id"]
    alice.call("messages.edit", {"message_id": typo, "text": "alice fixed"})
    regret = alice.call("messages.send", {"contact": "bob", "text": "alice regret"})["message_id"]
    alice.call("messages.delete", {"message_id": regret, "for_everyone": True})
    alice.call("messages.react", {"message_id": his, "emoji": "👍"})
    bob.wait_for(lambda: bob.call("messages.history", {"contact": "alice"})["messages"][-1][
        "deleted"], "alice's actions at bob")  # fmt: skip
    bob.call("messages.react", {"message_id": typo, "emoji": "❤️"})
    bob.call("messages.edit", {"message_id": draft, "text": "bob final"})
    alice.wait_for(lambda: one(alice, draft)["edits"] == 1  # type: ignore[index]
                   and one(alice, typo)["reactions"], "bob's edit and reaction")  # type: ignore[index]
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 3600})
    timed = alice.call("messages.send", {"contact": "bob", "text": "secret timed words"})
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 0})
    about = alice.call("messages.reply", {"contact": "bob", "message_id": timed["message_id"],
                                          "text": "about the timed one"})["message_id"]  # fmt: skip
    alice.stop()
    from tests.functional.test_message_actions import offline_store

    s = offline_store(alice)
    try:
        with s.transaction():  # stored under the looser rule before §26.2's present one
            s._q("INSERT INTO reactions (message_id, direction, emoji, created_at) "
                 "VALUES (?, 'in', '😀😀', 1)", (draft,))  # fmt: skip
    finally:
        s.close()
    alice.start()
    path = tmp_short / "alice.aegisbackup"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    plain = fmt.decrypt(PASS, path.read_bytes())
    assert plain[0] == fmt.FORMAT_VERSION == 5  # the extras came in version 4
    for gone in ("secret timed words", "alice regret", "alice typo", "bob draft", "😀😀",
                 "[timer]"):  # timer lines: the timer's history, not messages
        assert gone.encode() not in plain, gone
    bob.stop()  # nothing re-sent: what follows comes from the file

    new = peers("alice2")
    new.call("backup.import", {"path": str(path), "passphrase": PASS})
    got = one(new, answer)
    assert got is not None and got["reply_to"] == {"message_id": his, "text": "bob says hi"}
    assert one(new, his)["reactions"] == [{"emoji": "👍", "count": 1, "mine": True}]  # type: ignore[index]
    fixed = one(new, typo)
    assert fixed is not None and fixed["text"] == "alice fixed" and fixed["edits"] == 1
    assert fixed["edited_at"] == one(alice, typo)["edited_at"]  # type: ignore[index]
    assert fixed["reactions"] == [{"emoji": "❤️", "count": 1, "mine": False}]
    final = one(new, draft)
    assert final is not None and final["text"] == "bob final" and final["edits"] == 1
    assert final["reactions"] == []  # the refused one stayed out
    deleted = one(new, regret)
    assert deleted is not None and deleted["deleted"] and deleted["text"] == ""
    assert one(new, timed["message_id"]) is None
    quoting = one(new, about)
    assert quoting is not None and quoting["reply_to"]["text"] is None
    assert "secret timed words" not in json.dumps(new.call(
        "messages.history", {"contact": "bob", "limit": 500}))  # fmt: skip
