"""contacts.add with a link that can no longer be used (issue 14 item 5): what is known at once
fails the call; a refusal that comes later stays visible in contacts.list and status."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aegis_cli.client import RpcCallError
from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess


def cli(peer: Peer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(peer.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_used_invitation_fails_at_once(peers: Callable[[str], Peer]) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    for p in (alice, bob, carol):
        p.wait_connected()
    # Revoked: the call fails with the reason, and no contact is left behind.
    inv = bob.call("invitations.create")
    bob.call("invitations.revoke", {"invitation": inv["invitation"]})
    with pytest.raises(RpcCallError) as info:
        alice.call("contacts.add", {"name": "bob", "link": inv["link"]})
    assert info.value.code == 1022 and "already used" in str(info.value)
    assert alice.call("contacts.list")["contacts"] == []
    # Used by someone else: the CLI exits non-zero and says why.
    connect(alice, bob)
    link = bob.call("invitations.create")["link"]
    alice.call("contacts.remove", {"name": "bob"})
    alice.call("contacts.add", {"name": "bob", "link": link})
    bob.wait_for(lambda: len(bob.call("contacts.list")["contacts"]) == 2, "alice again")
    r = cli(carol, "contact", "add", "bob", link)
    assert r.returncode != 0 and "already used" in r.stderr, (r.stdout, r.stderr)
    assert "added" not in r.stdout
    assert carol.call("contacts.list")["contacts"] == []


@pytest.fixture
def slow_relay(tmp_short: Path) -> Iterator[RelayProcess]:
    """One deposit per mailbox, then one per 100 s: a second first contact is held back."""
    sub = tmp_short / "slow-relay"
    sub.mkdir()
    rp = RelayProcess(sub, {"--deposit-rate": "0.01", "--deposit-burst": "1"})
    rp.start()
    try:
        yield rp
    finally:
        rp.close()


def test_later_failure_stays_visible(tmp_short: Path, slow_relay: RelayProcess) -> None:
    url = f"ws://127.0.0.1:{slow_relay.port}/v1/ws"
    made = []
    try:
        alice, bob, carol = (Peer(tmp_short / n, url, n) for n in ("alice", "bob", "carol"))
        made = [alice, bob, carol]
        for p in made:
            p.wait_connected()
        link = bob.call("invitations.create")["link"]
        bob.stop()  # carol's first contact waits at the relay; the invitation still exists
        carol.call("contacts.add", {"name": "bob", "link": link})
        # The relay holds alice's first contact back (rate): nothing is known yet.
        added = alice.call("contacts.add", {"name": "bob", "link": link})
        assert added["established"] is False and added["failed"] is None
        assert added["first_contact"] == "pending"
        queued = alice.call("messages.send", {"contact": "bob", "text": "are you there?"})
        bob.start()  # carol's first contact uses the invitation: alice's retry is refused
        alice.wait_for(lambda: alice.events(types=["contact.failed"]), "the refusal", 120)
        (c,) = alice.call("contacts.list")["contacts"]
        assert c["name"] == "bob" and "already used" in c["failed"]
        assert alice.call("status")["contacts_failed"] == ["bob"]
        msgs = alice.call("messages.history", {"contact": "bob"})["messages"]
        assert [m["status"] for m in msgs if m["message_id"] == queued["message_id"]] == ["failed"]
        with pytest.raises(RpcCallError) as info:
            alice.call("messages.send", {"contact": "bob", "text": "again?"})
        assert info.value.code == 1024 and "already used" in str(info.value)
        r = cli(alice, "contacts")
        assert "bob  (failed: the invitation was already used" in r.stdout, r.stdout
        r = cli(alice, "status")
        assert "contacts failed: bob" in r.stdout, r.stdout
        # A fresh link replaces the failed contact.
        alice.call("contacts.add", {"name": "bob", "link": bob.call("invitations.create")["link"]})
        alice.wait_for(lambda: alice.call("contacts.list")["contacts"][0]["established"], "bob")
        assert alice.call("status")["contacts_failed"] == []
    finally:
        for p in made:
            p.stop()
