"""Linking a device end to end (docs/devices.md §4): a real relay, real daemons; the link's
blocks go through the relay, both screens show the same code, the new device gets the
identity, contacts and settings; a declined code, an expired link and a reused one are refused.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess


def state(peer: Peer) -> dict[str, Any]:
    link: dict[str, Any] = peer.call("devices.status")["link"]
    return link


def wait_state(peer: Peer, wanted: str) -> dict[str, Any]:
    out: dict[str, Any] = peer.wait_for(
        lambda: (s := state(peer)) and s["state"] == wanted and s, f"link state {wanted}", 90
    )
    return out


def error_of(peer: Peer, method: str, params: dict[str, Any]) -> RpcCallError:
    with pytest.raises(RpcCallError) as info:
        peer.call(method, params)
    return info.value


def texts(peer: Peer, contact: str) -> list[tuple[str, str]]:
    msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
    return [(m["direction"], m["text"]) for m in msgs]


def start_link(alice: Peer, new: Peer, **params: Any) -> str:
    link: str = alice.call("devices.link", params)["link"]
    assert link.startswith("aegis:")
    new.wait_connected()
    assert new.call("devices.join", {"link": link})["role"] == "join"
    return link


def test_link_installs_the_identity_contacts_and_settings(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("contacts.verify", {"name": "bob"})
    alice.call("settings.set", {"read_receipts": False})
    safety = alice.call("contacts.safety_number", {"name": "bob"})

    new = peers("alice2")
    link = start_link(alice, new)
    code_e, code_n = wait_state(alice, "code")["code"], wait_state(new, "code")["code"]
    assert code_e == code_n and len(code_e) == 7
    alice.call("devices.confirm", {"accept": True})
    new.call("devices.confirm", {"accept": True})
    wait_state(alice, "done")
    wait_state(new, "done")

    # The same identity: the safety number with bob is unchanged on the new device.
    contacts = new.call("contacts.list")["contacts"]
    assert [c["name"] for c in contacts] == ["bob"] and contacts[0]["verified"]
    assert new.call("contacts.safety_number", {"name": "bob"}) == safety
    assert new.call("settings.get")["read_receipts"] is False
    assert new.call("identity.get")["display_name"] == "alice"
    # One list on both (its version is clock-based: docs/devices.md), each marking itself.
    on_e, on_n = alice.call("devices.list"), new.call("devices.list")
    assert on_e["version"] == on_n["version"] > 0
    ids = {d["id"] for d in on_e["devices"]}
    assert ids == {d["id"] for d in on_n["devices"]} and len(ids) == 2
    mine_e = [d["id"] for d in on_e["devices"] if d["this_device"]]
    mine_n = [d["id"] for d in on_n["devices"] if d["this_device"]]
    assert len(mine_e) == len(mine_n) == 1 and mine_e != mine_n

    # The first device goes on as before: bob's text reaches it, its answer reaches bob.
    bob.call("messages.send", {"contact": "alice", "text": "after the link"})
    alice.wait_for(lambda: ("in", "after the link") in texts(alice, "bob"), "bob's text")
    alice.call("messages.send", {"contact": "bob", "text": "still here"})
    bob.wait_for(lambda: ("in", "still here") in texts(bob, "alice"), "alice's text")
    # The new device has no session with bob yet (no fan-out): it says so, sends nothing.
    assert not contacts[0]["established"]
    assert error_of(new, "messages.send", {"contact": "bob", "text": "x"}).code == 1024

    # A link works once: its mailbox is gone at the relay.
    third = peers("alice3")
    third.wait_connected()
    err = error_of(third, "devices.join", {"link": link})
    assert err.code == 1091
    assert third.call("contacts.list")["contacts"] == []

    # Removing the new device from the first: a new list without it.
    out = alice.call("devices.remove", {"id": mine_n[0]})
    assert out["version"] > on_e["version"] and out["devices"] == 1
    assert error_of(alice, "devices.remove", {"id": mine_e[0]}).code == 1095


@pytest.mark.parametrize("decliner", ["existing", "new"])
def test_a_declined_code_installs_nothing(peers: Callable[[str], Peer], decliner: str) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    new = peers("alice2")
    start_link(alice, new)
    wait_state(alice, "code")
    wait_state(new, "code")
    (alice if decliner == "existing" else new).call("devices.confirm", {"accept": False})
    if decliner == "new":
        # The other screen said yes: its profile goes to a mailbox N has deleted, and E
        # waits for a closing block that never comes, until the link expires.
        alice.call("devices.confirm", {"accept": True})
        time.sleep(2)
        assert state(alice)["state"] in ("confirmed", "failed")
        assert state(new)["state"] == "declined"
    else:
        new.call("devices.confirm", {"accept": True})
        time.sleep(2)  # the profile never comes: N stays confirmed, waiting, until expiry
        assert state(new)["state"] == "confirmed"
    assert new.call("contacts.list")["contacts"] == []
    assert new.call("devices.list")["version"] == 0
    assert new.call("identity.get")["display_name"] == "alice2"
    assert len(alice.call("devices.list")["devices"]) == 1


def test_an_expired_link_is_refused(peers: Callable[[str], Peer]) -> None:
    alice, new = peers("alice"), peers("alice2")
    alice.wait_connected()
    link = alice.call("devices.link", {"expires_in": 10})["link"]
    new.wait_connected()
    time.sleep(10.5)
    assert error_of(new, "devices.join", {"link": link}).code == 1091
    assert error_of(new, "devices.join", {"link": "aegis:AAAA"}).code == 1090
    assert alice.wait_for(lambda: state(alice)["state"] == "expired", "expiry")
    # The CLI says the same, in one line, and changes nothing.
    joined = aegis(new.home, "device", "join", link, "--yes")
    assert joined.returncode == 1 and "expired" in joined.stderr
    cancelled = aegis(alice.home, "device", "link", "--cancel")
    assert cancelled.returncode == 1 and "no device link" in cancelled.stderr
    assert new.call("devices.list")["version"] == 0


SEALED_BLOCK_LEN = wire.BLOCK_SIZE + 24 + 16  # a queued block, re-encrypted to its owner


def aegis(home: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(home)],
        capture_output=True, text=True, timeout=120, check=False, **kw,
    )  # fmt: skip


def test_cli_link_and_what_the_relay_sees(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    # Every block the relay queues from here on, as it stores it.
    with sqlite3.connect(relay_proc.data / "relay.sqlite3", timeout=10) as db:
        db.executescript(
            "CREATE TABLE seen (len INTEGER);"
            "CREATE TRIGGER seen_t AFTER INSERT ON messages "
            "BEGIN INSERT INTO seen VALUES (length(NEW.block)); END;"
        )
    offer = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "device", "link", "--yes",
         "--home", str(alice.home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    home = tmp_short / "alice2"
    try:
        assert offer.stdout is not None
        link = offer.stdout.readline().strip()
        assert link.startswith("aegis:")
        url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
        secret = tmp_short / "pass"
        secret.write_text("correct horse battery staple orbit\n")
        joined = aegis(home, "init", "--passphrase-file", str(secret), "--relay", url,
                       "--kdf-memory-kib", "1024", "--kdf-time-cost", "1",
                       "--kdf-parallelism", "1", "--link", link, "--yes")  # fmt: skip
        assert joined.returncode == 0, joined.stderr
        assert "Confirmation code:" in joined.stderr and "Linked" in joined.stdout
        _, err = offer.communicate(timeout=60)
        assert offer.returncode == 0, err
        # Both screens showed the same code.
        code_n = joined.stderr.split("Confirmation code: ")[1][:7]
        assert f"Confirmation code: {code_n}" in err
        listed = json.loads(aegis(home, "device", "list", "--json").stdout)
        assert len(listed["devices"]) == 2
        mine = aegis(alice.home, "device", "list").stdout
        assert mine.count("*") == 1 and f"version {listed['version']}" in mine
    finally:
        if offer.poll() is None:
            offer.kill()
        aegis(home, "stop")
    with sqlite3.connect(relay_proc.data / "relay.sqlite3", timeout=10) as db:
        sizes = [r[0] for r in db.execute("SELECT len FROM seen")]
    # request, accept, reveal, at least one profile block, done: each one block of the one size
    assert len(sizes) >= 5 and set(sizes) == {SEALED_BLOCK_LEN}


def test_a_tampered_link_does_not_burn_the_link(peers: Callable[[str], Peer]) -> None:
    """A request under a wrong link secret (what the relay, which holds the link mailbox's
    token, could deposit) does not open at E: the link stays usable for the real device."""
    alice = peers("alice")
    alice.wait_connected()
    link = alice.call("devices.link")["link"]
    body = link[len("aegis:") :]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-8 - 32 - 5] ^= 1  # a bit of the link secret
    tampered = "aegis:" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    forger, new = peers("forger"), peers("alice2")
    forger.wait_connected()
    assert forger.call("devices.join", {"link": tampered})["state"] == "waiting"
    time.sleep(2)
    assert state(alice)["state"] == "waiting" and state(forger)["state"] == "waiting"
    new.wait_connected()
    new.call("devices.join", {"link": link})
    assert wait_state(alice, "code")["code"] == wait_state(new, "code")["code"]
    assert state(forger)["state"] == "waiting"
    alice.call("devices.cancel")
    assert state(alice)["state"] == "declined"
