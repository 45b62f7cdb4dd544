"""Linking a device end to end (docs/devices.md §4): a real relay, real daemons; the link's
blocks go through the relay, both screens show the same code, the new device gets the
identity, contacts and settings; a declined code, an expired link and a reused one are refused.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from tests.functional.conftest import T_DEVICE, Peer, connect
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


def watch_blocks(relay: RelayProcess) -> Callable[[], int]:
    """How many blocks the relay has queued since this call (a trigger on its store)."""
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        db.executescript(
            "CREATE TABLE IF NOT EXISTS seen (len INTEGER);"
            "CREATE TRIGGER IF NOT EXISTS seen_t AFTER INSERT ON messages "
            "BEGIN INSERT INTO seen VALUES (length(NEW.block)); END;"
        )

    def count() -> int:
        with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
            return int(db.execute("SELECT count(*) FROM seen").fetchone()[0])

    return count


def confirm_both(alice: Peer, new: Peer) -> str:
    """N shows the code; E's user types it (E never shows it)."""
    assert wait_state(alice, "code")["code"] is None
    code: str = wait_state(new, "code")["code"]
    assert alice.call("devices.confirm", {"code": code})["state"] == "confirmed"
    new.call("devices.confirm", {"accept": True})
    return code


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
    wait_state(alice, "code")
    # On E the code is typed, never taken on trust: no code, no profile.
    assert error_of(alice, "devices.confirm", {"accept": True}).code == -32602
    assert len(confirm_both(alice, new)) == 7
    wait_state(alice, "done")
    wait_state(new, "done")
    # The link's state and code never reach the disk: no devices.link event is stored.
    for peer in (alice, new):
        stored = peer.call("events.list", {"limit": 1000})["events"]
        assert [e for e in stored if e["type"] == "devices.link"] == []

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
    # The new device's session with bob comes from bob's fan-out: test_devices_fanout.py.

    # The setting max_linked_devices (1 to 5) bounds the list below the protocol's 6.
    assert error_of(alice, "settings.set", {"max_linked_devices": 6}).code == -32602
    assert alice.call("settings.set", {"max_linked_devices": 1})["max_linked_devices"] == 1
    assert error_of(alice, "devices.link", {}).code == 1093
    alice.call("settings.set", {"max_linked_devices": 5})

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


@pytest.mark.parametrize("decliner", ["existing", "wrong code", "new"])
def test_a_declined_code_installs_nothing(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, decliner: str
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    new = peers("alice2")
    blocks = watch_blocks(relay_proc)
    start_link(alice, new)
    wait_state(alice, "code")
    code = wait_state(new, "code")["code"]
    assert blocks() == 3  # request, accept, reveal
    if decliner == "new":
        new.call("devices.confirm", {"accept": False})
        time.sleep(1)  # N deletes its reply mailbox
        # E's user typed the right code: its profile deposit is refused (the mailbox is gone).
        alice.call("devices.confirm", {"code": code})
        assert wait_state(alice, "failed")["reason"]
        assert state(new)["state"] == "declined"
    else:
        if decliner == "existing":
            alice.call("devices.confirm", {"accept": False})
        else:  # a wrong code is a no: the link ends at once
            wrong = f"{(int(code.replace(' ', '')) + 1) % 10**6:06d}"
            assert alice.call("devices.confirm", {"code": wrong})["state"] == "declined"
        assert state(alice)["state"] == "declined"
        new.call("devices.confirm", {"accept": True})
        time.sleep(1)
        assert blocks() == 3  # no profile block ever left E
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
    joined = aegis(new.home, "device", "join", "-", "--yes", input=link + "\n")
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
        [sys.executable, "-m", "aegis_cli.main", "device", "link",
         "--home", str(alice.home)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    home = tmp_short / "alice2"
    joiner: subprocess.Popen[str] | None = None
    try:
        assert offer.stdout is not None and offer.stdin is not None
        link = offer.stdout.readline().strip()
        assert link.startswith("aegis:")
        url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
        secret = tmp_short / "pass"
        secret.write_text("correct horse battery staple orbit\n")
        joiner = subprocess.Popen(
            [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(home),
             "--passphrase-file", str(secret), "--relay", url, "--kdf-memory-kib", "1024",
             "--kdf-time-cost", "1", "--kdf-parallelism", "1", "--link", "-", "--yes"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert joiner.stdin is not None and joiner.stderr is not None
        joiner.stdin.write(link + "\n")  # the link out of argv
        joiner.stdin.flush()
        line = ""
        while "Confirmation code: " not in line:
            line = joiner.stderr.readline()
            assert line, "the new device showed no code"
        code_n = line.split("Confirmation code: ")[1][:7]
        # E's user is asked to TYPE the code, told what typing it gives away.
        offer.stdin.write(code_n + "\n")
        offer.stdin.flush()
        out_n, err_n = joiner.communicate(timeout=90)
        assert joiner.returncode == 0, err_n
        assert "Linked" in out_n
        _, err = offer.communicate(timeout=60)
        assert offer.returncode == 0, err
        assert "identity key" in err and "Code the new device shows" in err
        assert code_n not in err  # E never shows the code
        listed = json.loads(aegis(home, "device", "list", "--json").stdout)
        assert len(listed["devices"]) == 2
        mine = aegis(alice.home, "device", "list").stdout
        assert mine.count("*") == 1 and f"version {listed['version']}" in mine
    finally:
        for proc in (offer, joiner):
            if proc is not None and proc.poll() is None:
                proc.kill()
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
    wait_state(alice, "code")
    wait_state(new, "code")
    assert state(forger)["state"] == "waiting"
    alice.call("devices.cancel")
    assert state(alice)["state"] == "declined"


def test_a_slow_user_at_the_code_step(tmp_short: Path) -> None:
    """A relay that drops a silent connection after 5 s, users who take 9 s to confirm: the
    link's connections keep polling while they wait, and the link completes."""
    sub = tmp_short / "slowrelay"
    sub.mkdir()
    relay = RelayProcess(sub, {"--idle-timeout": "5"})
    relay.start()
    made: list[Peer] = []
    try:
        url = f"ws://127.0.0.1:{relay.port}/v1/ws"
        alice, new = Peer(tmp_short / "alice", url, "alice"), Peer(tmp_short / "n", url, "n")
        made += [alice, new]
        alice.wait_connected()
        start_link(alice, new)
        wait_state(alice, "code")
        code = wait_state(new, "code")["code"]
        time.sleep(9)  # the humans compare, longer than the relay's idle timeout
        alice.call("devices.confirm", {"code": code})
        wait_state(new, "code")
        time.sleep(7)  # N's user is slow too (N waits with the whole profile)
        new.call("devices.confirm", {"accept": True})
        wait_state(alice, "done")
        assert wait_state(new, "done")["reason"] is None
        assert new.call("identity.get")["display_name"] == "alice"
    finally:
        for p in made:
            p.stop()
        relay.close()


def test_one_link_at_a_time_and_a_failed_init_link_leaves_nothing(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    alice = peers("alice")
    alice.wait_connected()
    alice.call("devices.link")  # makes the address and the list: the race below is the link's
    alice.call("devices.cancel")
    results: list[Any] = []

    def link() -> None:
        try:
            results.append(alice.call("devices.link"))
        except RpcCallError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=link) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(str(r) for r in results if isinstance(r, int)) == ["1092"], results
    alice.call("devices.cancel")

    # A failed `aegis init --link` removes the profile it made and stops its daemon: the
    # next try starts from nothing.
    home = tmp_short / "gone"
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    out = aegis(home, "init", "--no-passphrase", "--relay", url, "--link", "-", "--yes",
                input="aegis:AAAA\n")  # fmt: skip
    assert out.returncode == 1 and "not an AegisLink device link" in out.stderr
    assert "WARNING: --no-passphrase" in out.stderr
    assert not home.exists()


def test_a_restart_voids_the_link_at_the_relay(peers: Callable[[str], Peer]) -> None:
    """E restarts mid-link: the link's mailbox, left behind, is deleted at the relay on the
    next connection, so a new device that tries the link is told at once (not left waiting
    ten minutes for an E that forgot it)."""
    alice, new = peers("alice"), peers("alice2")
    alice.wait_connected()
    link = alice.call("devices.link")["link"]
    alice.kill()  # no clean end: the mailbox stays at the relay
    alice.start()
    alice.wait_connected()
    assert alice.call("devices.status")["link"] is None
    new.wait_connected()

    def refused() -> bool:
        try:
            new.call("devices.join", {"link": link})
        except RpcCallError as exc:
            assert exc.code == 1091
            return True
        new.call("devices.cancel")
        return False

    new.wait_for(refused, "the left link mailbox deleted at the relay")


def test_a_lock_ends_the_link(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """A lock mid-link ends it (failed, said), and the slot is free after the unlock."""
    home, secret = tmp_short / "locker", tmp_short / "pw"
    secret.write_text("correct horse battery staple orbit\n")
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    made = aegis(home, "init", "--passphrase-file", str(secret), "--relay", url,
                 "--kdf-memory-kib", "1024", "--kdf-time-cost", "1", "--kdf-parallelism", "1")
    assert made.returncode == 0, made.stderr
    alice = Peer.__new__(Peer)  # a Peer with a passphrase (the fixture's have none)
    alice.home, alice.name, alice.proc = home, "locker", None
    alice.start()
    try:
        alice.call("unlock", {"passphrase": "correct horse battery staple orbit"})
        alice.wait_connected()
        new = peers("alice2")
        start_link(alice, new)
        wait_state(alice, "code")
        alice.call("lock")
        alice.call("unlock", {"passphrase": "correct horse battery staple orbit"})
        assert state(alice)["state"] == "failed"
        assert state(alice)["reason"] == "the profile was locked"
        alice.wait_connected()
        assert alice.call("devices.link")["link"].startswith("aegis:")
    finally:
        alice.stop()


def test_a_failure_after_the_install_ends_done_with_a_warning(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """The new device's own relay refuses its bundle (one prekey item per kind): the profile
    is installed all the same, so the link ends done, with a warning, not failed."""
    sub = tmp_short / "relayb"
    sub.mkdir()
    relay_b = RelayProcess(sub, {"--bundle-items-per-kind": "1"})
    relay_b.start()
    new: Peer | None = None
    try:
        alice = peers("alice")
        alice.wait_connected()
        new = Peer(tmp_short / "nb", f"ws://127.0.0.1:{relay_b.port}/v1/ws", "nb")
        new.wait_connected()
        link = alice.call("devices.link")["link"]
        new.call("devices.join", {"link": link})
        confirm_both(alice, new)
        wait_state(alice, "done")
        done = wait_state(new, "done")
        assert done["reason"] and "address" in done["reason"]
        assert new.call("identity.get")["display_name"] == "alice"
        assert error_of(new, "devices.cancel", {}).code == 1092
    finally:
        if new is not None:
            new.stop()
        relay_b.close()


def test_a_stop_while_the_new_device_installs_does_not_hang(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """The new device's daemon stopped while it installs: the stop ends (the install's
    reconfigure takes the daemon's lock, which the stop holds while it waits for the link: it
    runs after the link now, not inside it), and the profile is installed whole. The new
    device's own relay is paused once its device mailbox is made, so the install (which makes
    the address there) waits while the stop is asked for."""
    sub = tmp_short / "relayn"
    sub.mkdir()
    relay_n = RelayProcess(sub, {})
    relay_n.start()
    new: Peer | None = None
    try:
        alice = peers("alice")
        alice.wait_connected()
        new = Peer(tmp_short / "nn", f"ws://127.0.0.1:{relay_n.port}/v1/ws", "nn")
        new.wait_connected()
        blocks = watch_blocks(relay_proc)

        def mailboxes() -> int:
            with sqlite3.connect(relay_n.data / "relay.sqlite3", timeout=10) as db:
                return int(db.execute("SELECT count(*) FROM mailboxes").fetchone()[0])

        start_link(alice, new)
        confirm_both(alice, new)
        made, seen = mailboxes(), blocks()
        # N's device mailbox made at its relay, then its `done` block deposited at the link's
        # relay (so the make was answered): pause N's relay before E's final block reaches N.
        while not (mailboxes() > made and blocks() > seen):
            seen = blocks() if mailboxes() == made else seen
            assert state(new)["state"] in ("confirmed", "code"), state(new)
        assert relay_n.proc is not None
        relay_n.proc.send_signal(signal.SIGSTOP)
        try:
            got = wait_state(new, "installing")
            assert got["reason"] is None
            new.call("daemon.stop")
        finally:
            relay_n.proc.send_signal(signal.SIGCONT)
        assert new.proc is not None
        new.proc.proc.wait(60)  # before the fix: the daemon never exits
        new.start()
        assert new.call("identity.get")["display_name"] == "alice"
        assert len(new.call("devices.list")["devices"]) == 2
    finally:
        if new is not None:
            new.stop()
        relay_n.close()


def test_a_failed_init_link_removes_only_the_profiles_files(
    relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """`aegis init --link` into an existing folder: what another program puts there while the
    command runs (here while it reads the passphrase) survives the cleanup of a failed link;
    the profile's own files go, and its daemon was stopped first."""
    home = tmp_short / "shared"
    home.mkdir()
    (home / "before.txt").write_text("kept")
    fifo = tmp_short / "pwfifo"
    os.mkfifo(fifo)
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(home),
         "--passphrase-file", str(fifo), "--relay", url, "--kdf-memory-kib", "1024",
         "--kdf-time-cost", "1", "--kdf-parallelism", "1", "--link", "-", "--yes"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdin is not None
        proc.stdin.write("aegis:AAAA\n")
        proc.stdin.close()
        proc.stdin = None  # given: communicate() below only reads
        with open(fifo, "w") as w:  # blocks until the command reads its passphrase
            (home / "other.txt").write_text("another program's")
            (home / "otherdir").mkdir()
            w.write("correct horse battery staple orbit\n")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "not an AegisLink device link" in err, err
    assert "still runs" not in err
    assert sorted(os.listdir(home)) == ["before.txt", "other.txt", "otherdir"]


def test_a_cancel_while_the_link_is_set_up_ends_it(peers: Callable[[str], Peer]) -> None:
    """devices.cancel sent again and again while devices.link runs (a profile's first link
    makes its address and list first: the set-up takes a while). Once a cancel is accepted the
    link is over: devices.link fails `ended` if it was still setting up, and a link text it
    gave out is refused (`gone`), never answered with a code."""
    alice, new = peers("alice"), peers("alice2")
    alice.wait_connected()
    new.wait_connected()
    results: list[Any] = []

    def link() -> None:
        try:
            results.append(alice.call("devices.link"))
        except RpcCallError as exc:
            results.append(exc)

    thread = threading.Thread(target=link)
    thread.start()
    cancelled = False
    while not cancelled:
        try:
            alice.call("devices.cancel")
            cancelled = True
        except RpcCallError as exc:
            assert exc.code == 1092
            assert thread.is_alive() or not results or isinstance(results[0], RpcCallError)
    thread.join(60)
    assert state(alice)["state"] == "declined"
    got = results[0]
    if isinstance(got, RpcCallError):  # cancelled while it was being set up
        assert got.code == 1092 and "being set up" in str(got), got
        return

    def refused() -> bool:
        try:
            new.call("devices.join", {"link": got["link"]})
        except RpcCallError as exc:
            assert exc.code == 1091
            return True
        new.call("devices.cancel")
        return False

    new.wait_for(refused, "the cancelled link's mailbox deleted at the relay")
    assert state(alice)["state"] == "declined"


def test_a_second_device_on_a_used_link_is_refused_at_once(peers: Callable[[str], Peer]) -> None:
    """A second device with the link while it runs is answered "used" by the device in use
    (not left waiting for the link's ten minutes), and the running link completes."""
    alice = peers("alice")
    alice.wait_connected()
    new, other = peers("alice2"), peers("other")
    link = start_link(alice, new)
    wait_state(alice, "code")  # E waits for its user: it still answers the second device
    other.wait_connected()
    assert other.call("devices.join", {"link": link})["state"] == "waiting"
    refused = wait_state(other, "failed")  # well inside the link's 600 s
    assert refused["reason"] == "this link was already used" and refused["code"] is None
    assert state(alice)["state"] == "code" and state(new)["state"] == "code"
    confirm_both(alice, new)
    wait_state(alice, "done")
    assert wait_state(new, "done")["reason"] is None
    assert len(alice.call("devices.list")["devices"]) == 2
    assert new.call("devices.list")["unconfirmed"] is False
    assert new.call("identity.get")["display_name"] == "alice"
    assert other.call("devices.list")["version"] == 0  # nothing installed there
    assert other.call("identity.get")["display_name"] == "other"


def deposits_by_mailbox(relay: RelayProcess) -> Callable[[], list[int]]:
    """The mailbox of every block the relay queues from this call on, in order."""
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        db.executescript(
            "CREATE TABLE IF NOT EXISTS seen_mb (mailbox INTEGER);"
            "CREATE TRIGGER IF NOT EXISTS seen_mb_t AFTER INSERT ON messages "
            "BEGIN INSERT INTO seen_mb VALUES (NEW.mailbox); END;"
        )
        start = int(db.execute("SELECT count(*) FROM seen_mb").fetchone()[0])

    def seen() -> list[int]:
        with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
            rows = db.execute("SELECT mailbox FROM seen_mb ORDER BY rowid").fetchall()
        return [int(r[0]) for r in rows[start:]]

    return seen


def relay_mailboxes(relay: RelayProcess) -> set[int]:
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        return {int(r[0]) for r in db.execute("SELECT id FROM mailboxes")}


def up_to_the_final(
    alice: Peer, new: Peer, relay: RelayProcess, **params: Any
) -> tuple[Callable[[], list[int]], int, int, set[int]]:
    """A link run until E deposited its final, with N paused (SIGSTOP) since just after its
    closing block, so it has not fetched the final. The order is forced, not raced: E is
    paused before N's closing block, N once it is queued, and E goes on only then. Returns
    the deposits' mailboxes, the link mailbox, N's reply mailbox and N's device mailbox."""
    seen = deposits_by_mailbox(relay)
    start_link(alice, new, **params)
    wait_state(alice, "code")
    code = wait_state(new, "code")["code"]
    alice.call("devices.confirm", {"code": code})
    # The request, then the accept (into N's reply mailbox), the reveal, the profile (one
    # block for this small profile) into the reply mailbox: then E is paused.
    alice.wait_for(lambda: (s := seen()) and len(s) > 1 and s.count(s[1]) >= 2, "profile", 60)
    assert alice.proc is not None and new.proc is not None
    alice.proc.proc.send_signal(signal.SIGSTOP)
    try:
        blocks = seen()
        link_mb, reply = blocks[0], blocks[1]
        assert blocks.count(link_mb) == 2, blocks
        before = relay_mailboxes(relay)
        new.call("devices.confirm", {"accept": True})
        new.wait_for(lambda: seen().count(link_mb) >= 3, "N's closing block", 60)
        new.proc.proc.send_signal(signal.SIGSTOP)
        device_mb = relay_mailboxes(relay) - before  # made by N just before its closing block
        done_at = len(seen())
    finally:
        alice.proc.proc.send_signal(signal.SIGCONT)
    alice.wait_for(lambda: len(seen()) > done_at, "E's final", 60)
    assert seen()[done_at] == reply and len(device_mb) == 1
    return seen, link_mb, reply, device_mb


def test_a_new_device_killed_before_its_final_is_never_listed(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """N is killed (-9) after its closing block, before it fetched E's final: E lists it only
    once N says it installed the profile, so after the link's end E's list is its own alone;
    N, restarted, has installed nothing, and deletes at the relay both mailboxes the link left
    (its reply mailbox and its device mailbox: devices.link_mailbox lists every one)."""
    alice, new = peers("alice"), peers("alice2")
    alice.wait_connected()
    new.wait_connected()
    try:
        _, _, reply, device_mb = up_to_the_final(alice, new, relay_proc, expires_in=20)
    finally:
        new.kill()
    left = {reply} | device_mb
    assert left <= relay_mailboxes(relay_proc)
    assert state(alice)["state"] == "confirmed"
    assert len(alice.call("devices.list")["devices"]) == 1  # not listed on the final
    ended = alice.wait_for(
        lambda: (s := state(alice))["state"] != "confirmed" and s, "the link's end", 150
    )
    assert ended["state"] == "expired" and "not listed" in ended["reason"]
    assert len(alice.call("devices.list")["devices"]) == 1
    new.start()
    assert new.call("devices.list")["version"] == 0
    assert new.call("identity.get")["display_name"] == "alice2"
    new.wait_for(lambda: not left & relay_mailboxes(relay_proc), "the mailboxes deleted", 60)


def test_the_device_in_use_killed_after_its_final_lists_nothing_and_n_says_so(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """E is killed (-9) after its final, before it took N's "installed": E never lists N; N is
    installed and says, at the link's end and after a restart, that E did not confirm."""
    alice, new = peers("alice"), peers("alice2")
    alice.wait_connected()
    new.wait_connected()
    assert alice.proc is not None and new.proc is not None
    try:
        seen, link_mb, _, _ = up_to_the_final(alice, new, relay_proc)
        alice.proc.proc.send_signal(signal.SIGSTOP)  # before N can answer
        new.proc.proc.send_signal(signal.SIGCONT)
        wait_state(new, "listing")  # installed, "installed" deposited, waiting for "listed"
        assert seen().count(link_mb) == 4
    finally:
        alice.kill()
        new.proc.proc.send_signal(signal.SIGCONT)
    assert new.call("devices.list")["unconfirmed"] is True
    new.call("daemon.stop")  # ends the wait: done, with the warning
    new.proc.proc.wait(60)
    new.start()
    listed = new.call("devices.list")
    assert listed["unconfirmed"] is True and len(listed["devices"]) == 2
    assert new.call("identity.get")["display_name"] == "alice"
    assert "never confirmed" in aegis(new.home, "device", "list").stdout
    alice.start()
    assert len(alice.call("devices.list")["devices"]) == 1  # N never listed on E


def _device_mailbox(peer: Peer) -> bytes:
    """The deposit ID of a device's device mailbox (its address, docs/devices.md §4.5)."""
    link = wire.ContactLink.from_text(peer.call("address.get")["link"])
    return link.mailbox.deposit_id


def _at_relay(relay: RelayProcess, deposit_id: bytes) -> bool:
    from relay.storage import deposit_key

    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        return db.execute("SELECT 1 FROM mailboxes WHERE deposit_key = ?",
                          (deposit_key(deposit_id),)).fetchone() is not None  # fmt: skip


def _raw_deposit_refused(relay: RelayProcess, deposit_id: bytes) -> bool:
    """A stranger's deposit (paid with a proof of work, as into any public mailbox) is
    refused as into a mailbox that does not exist."""
    import asyncio

    from relay.client import RelayClient, RelayError
    from relay.wire import E_DENIED

    async def go() -> bool:
        c = await RelayClient.connect(relay.url)
        try:
            await c.deposit(deposit_id, os.urandom(wire.BLOCK_SIZE))
        except RelayError as exc:
            return exc.code == E_DENIED
        finally:
            await c.close()
        return False

    return asyncio.run(go())


def _linked(alice: Peer, new: Peer) -> tuple[str, str]:
    """A whole link; the device IDs of E and N."""
    alice.wait_connected()
    start_link(alice, new)
    confirm_both(alice, new)
    wait_state(alice, "done")
    wait_state(new, "done")
    devices = alice.call("devices.list")["devices"]
    mine = [d["id"] for d in devices if d["this_device"]]
    other = [d["id"] for d in devices if not d["this_device"]]
    assert len(mine) == len(other) == 1
    return mine[0], other[0]


def _queued_for(relay: RelayProcess, peer: Peer, but: bytes) -> int:
    """Blocks queued at the relay in the mailboxes of the peer's store but one (the daemon
    stopped)."""
    from aegisd.services.mailbox import OwnedMailbox
    from aegisd.store import open_profile
    from relay.storage import deposit_key

    store = open_profile(peer.home, None)
    try:
        keys = [deposit_key(OwnedMailbox.from_bytes(r.descriptor).deposit_id)
                for r in store.list_mailboxes()
                if OwnedMailbox.from_bytes(r.descriptor).deposit_id != but]  # fmt: skip
    finally:
        store.close()
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        return sum(db.execute("SELECT count(*) FROM messages m JOIN mailboxes b ON "
                              "b.id = m.mailbox WHERE b.deposit_key = ?", (k,)).fetchone()[0]
                   for k in keys)  # fmt: skip


def delete_keys_for(peer: Peer, device_id: str) -> int:
    """How many of that device's mailboxes ``peer`` holds a delete key for (devices.list; -1:
    not listed)."""
    return int(next((d["delete_keys"] for d in peer.call("devices.list")["devices"]
                     if d["id"] == device_id), -1))  # fmt: skip


def test_removing_an_offline_device_deletes_its_mailbox_at_the_relay_at_once(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """A1 links A2, A2 is stopped, A1 removes it: A2's mailboxes are deleted at the relay at
    once with the delete keys A2 gave (its device mailbox's in its "installed", the others
    over sync; A1 never had their owner keys); a deposit there is refused as into no mailbox,
    and what waited there for A2 went with them. Bob, told of the removal (fan-out), sends to
    A1 only: A2 restarted receives nothing."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    new = peers("alice2")
    _, new_id = _linked(alice, new)
    # Bob learns of A2 and opens a session with it (docs/devices.md §5.3).
    new.wait_for(lambda: new.call("contacts.list")["contacts"][0]["established"], "bob")
    bob.wait_for(lambda: [e for e in bob.events(types=["contact.devices"])
                          if e["data"]["devices"] == 2], "A2's session", T_DEVICE)  # fmt: skip
    # Its device mailbox, its contact mailbox for Bob, its sync mailbox for A1 (at least).
    alice.wait_for(lambda: delete_keys_for(alice, new_id) >= 3, "A2's delete keys", T_DEVICE)
    device_mb = _device_mailbox(new)
    assert _at_relay(relay_proc, device_mb)
    new.stop()
    # A2's other mailboxes (those of its sessions): what is queued there while it is away.
    empty = _queued_for(relay_proc, new, device_mb)
    bob.call("messages.send", {"contact": "alice", "text": "before the removal"})
    alice.wait_for(lambda: ("in", "before the removal") in texts(alice, "bob"), "A1")
    bob.wait_for(lambda: _queued_for(relay_proc, new, device_mb) > empty, "the text for A2")
    held = delete_keys_for(alice, new_id)
    out = alice.call("devices.remove", {"id": new_id})
    # Each mailbox A1 held a key for, and the sync mailbox A1 made for A2 (test_devices_caps.py).
    assert (out["mailboxes_deleted"], out["mailboxes_queued"], out["devices"]) == (held + 1, 0, 1)
    assert (out["mailboxes_refused"], out["contacts_told"]) == (0, 1)
    assert not _at_relay(relay_proc, device_mb)
    assert _raw_deposit_refused(relay_proc, device_mb)
    assert _queued_for(relay_proc, new, device_mb) == 0  # Bob's text went with its mailbox
    # A second removal has nothing left to delete (the capabilities went with the first).
    assert error_of(alice, "devices.remove", {"id": new_id}).code == 1095
    bob.wait_for(lambda: bob.events(types=["contact.devices"])[-1]["data"]["devices"] == 1,
                 "the removal")  # fmt: skip
    bob.call("messages.send", {"contact": "alice", "text": "after the removal"})
    alice.wait_for(lambda: ("in", "after the removal") in texts(alice, "bob"), "A1")
    assert _queued_for(relay_proc, new, device_mb) == 0  # nothing for A2
    new.start()
    new.wait_connected()
    assert not _at_relay(relay_proc, device_mb)  # nothing brought it back
    assert _raw_deposit_refused(relay_proc, device_mb)
    assert ("in", "after the removal") not in texts(new, "bob")
    # A2 still holds its own list: a removed device is not sent the list that removes it.
    assert len(new.call("devices.list")["devices"]) == 2


def test_a_removal_while_the_relay_is_away_deletes_at_the_next_connection(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """The relay away: the deletion is queued (in the store), survives a restart of the
    daemon, and is done on its next connection. The other way round too: N holds E's device
    mailbox's delete key (from the link's profile) and can delete it."""
    alice, new = peers("alice"), peers("alice2")
    alice_id, new_id = _linked(alice, new)
    new_mb, alice_mb = _device_mailbox(new), _device_mailbox(alice)
    new.stop()
    relay_proc.terminate()
    out = alice.call("devices.remove", {"id": new_id})
    # Its device mailbox, and the sync mailbox made here for it if the sync session opened.
    assert out["mailboxes_deleted"] == 0 and out["mailboxes_queued"] >= 1
    alice.stop()
    relay_proc.start()
    assert _at_relay(relay_proc, new_mb)
    alice.start()
    alice.wait_for(lambda: not _at_relay(relay_proc, new_mb), "the queued deletion", 60)
    assert _raw_deposit_refused(relay_proc, new_mb)
    # N removes E (a list of its own: the devices do not sync lists yet): E's device mailbox
    # goes with the delete key E's profile gave N.
    new.start()
    new.wait_connected()
    assert _at_relay(relay_proc, alice_mb)
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "device", "remove", alice_id,
         "--home", str(new.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert re.search(r"\b[1-9]\d* of its mailboxes deleted at the relay;", r.stdout), r.stdout
    assert not _at_relay(relay_proc, alice_mb)


PASSPHRASE = "correct horse battery staple orbit"


def locked_peer(home: Path, relay: RelayProcess, name: str) -> Peer:
    """A Peer whose profile has a passphrase (the fixture's have none), started, unlocked."""
    secret = home.parent / f"{name}.pw"
    secret.write_text(PASSPHRASE + "\n")
    made = aegis(home, "init", "--passphrase-file", str(secret), "--relay",
                 f"ws://127.0.0.1:{relay.port}/v1/ws", "--kdf-memory-kib", "1024",
                 "--kdf-time-cost", "1", "--kdf-parallelism", "1")  # fmt: skip
    assert made.returncode == 0, made.stderr
    peer = Peer.__new__(Peer)
    peer.home, peer.name, peer.proc = home, name, None
    peer.start()
    peer.call("unlock", {"passphrase": PASSPHRASE})
    peer.wait_connected()
    return peer


def test_a_lock_while_n_waits_for_listed_ends_done_unconfirmed_and_e_lists_it(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """N locked while `listing` (E paused, so LISTED has not come): the lock returns, the
    link ends `done` with the warning, `unconfirmed` is set; E, resumed, takes INSTALLED and
    lists N (the false alarm of docs/devices.md §4.3), and the user dismisses the warning on N
    (`aegis device confirm-listed`, which before the fix did not exist: the flag stayed)."""
    alice = peers("alice")
    alice.wait_connected()
    new = locked_peer(tmp_short / "nlock", relay_proc, "nlock")
    assert alice.proc is not None and new.proc is not None
    try:
        up_to_the_final(alice, new, relay_proc)
        alice.proc.proc.send_signal(signal.SIGSTOP)  # before N's "installed" is taken
        new.proc.proc.send_signal(signal.SIGCONT)
        wait_state(new, "listing")
        new.call("lock")
        new.call("unlock", {"passphrase": PASSPHRASE})
        ended = state(new)
        assert ended["state"] == "done" and "did not confirm" in ended["reason"], ended
        assert new.call("devices.list")["unconfirmed"] is True
        alice.proc.proc.send_signal(signal.SIGCONT)
        assert wait_state(alice, "done")["reason"] is None
        assert len(alice.call("devices.list")["devices"]) == 2  # E listed N all the same
        assert "confirm-listed" in aegis(new.home, "device", "list").stdout
        cleared = aegis(new.home, "device", "confirm-listed")
        assert cleared.returncode == 0, cleared.stderr
        listed = new.call("devices.list")
        assert listed["unconfirmed"] is False and len(listed["devices"]) == 2
        assert "never confirmed" not in aegis(new.home, "device", "list").stdout
    finally:
        alice.proc.proc.send_signal(signal.SIGCONT)
        new.stop()


def test_a_failed_init_link_keeps_a_profile_its_dead_daemon_may_have_installed(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aegis init --link` whose daemon died (-9) after the install (here while `listing`):
    no daemon answers, so the command cannot know whether the install committed. Before the
    fix it took that for "nothing installed" and deleted the installed profile; now it keeps
    it and says what to check. The profile, restarted, holds the identity and the list."""
    from aegis_cli.devices import after_failure
    from aegis_cli.main import Ctx

    alice, new = peers("alice"), peers("alice2")
    alice.wait_connected()
    new.wait_connected()
    assert alice.proc is not None and new.proc is not None
    try:
        up_to_the_final(alice, new, relay_proc)
        alice.proc.proc.send_signal(signal.SIGSTOP)
        new.proc.proc.send_signal(signal.SIGCONT)
        wait_state(new, "listing")
        new.kill()
    finally:
        alice.proc.proc.send_signal(signal.SIGCONT)
    before = set(os.listdir(new.home)) - {"aegis.db"}  # an undo would delete the database
    after_failure(Ctx(str(new.home), False), None, lambda: False, before, True)
    assert "may have been installed, so it was kept" in capsys.readouterr().err
    assert (new.home / "aegis.db").exists()
    new.start()
    assert new.call("identity.get")["display_name"] == "alice"
    assert len(new.call("devices.list")["devices"]) == 2


def test_installed_leaves_before_the_new_devices_relay_work(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """N's own relay is paused (SIGSTOP) once its device mailbox is made: N's install commits,
    INSTALLED goes to the link's relay at once and E lists N, while N still waits on its own
    relay for the bundle (`installing`). Before the fix INSTALLED waited for that relay work,
    spending E's INSTALLED window (E could not be done while N was still installing)."""
    sub = tmp_short / "relayi"
    sub.mkdir()
    relay_n = RelayProcess(sub, {})
    relay_n.start()
    new: Peer | None = None
    try:
        alice = peers("alice")
        alice.wait_connected()
        new = Peer(tmp_short / "ni", f"ws://127.0.0.1:{relay_n.port}/v1/ws", "ni")
        new.wait_connected()
        blocks = watch_blocks(relay_proc)

        def mailboxes() -> int:
            with sqlite3.connect(relay_n.data / "relay.sqlite3", timeout=10) as db:
                return int(db.execute("SELECT count(*) FROM mailboxes").fetchone()[0])

        start_link(alice, new)
        confirm_both(alice, new)
        made, seen = mailboxes(), blocks()
        while not (mailboxes() > made and blocks() > seen):  # as in the stop test above
            seen = blocks() if mailboxes() == made else seen
            assert state(new)["state"] in ("confirmed", "code"), state(new)
        assert relay_n.proc is not None
        relay_n.proc.send_signal(signal.SIGSTOP)
        try:
            assert wait_state(alice, "done")["reason"] is None
            assert state(new)["state"] == "installing"  # its bundle: still at its paused relay
            assert len(alice.call("devices.list")["devices"]) == 2
        finally:
            relay_n.proc.send_signal(signal.SIGCONT)
        done = wait_state(new, "done")
        assert new.call("identity.get")["display_name"] == "alice"
        assert done["reason"] is None or "bundle" in done["reason"], done
    finally:
        if new is not None:
            new.stop()
        relay_n.close()


def test_a_second_request_in_the_fetch_that_used_the_link_is_answered_used(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """E paused while two devices send their requests, so one FETCH brings both: the first
    uses the link, the second is answered "used" at once (the LinkUsed branch of E's request
    step), and the first goes on to its code."""
    alice = peers("alice")
    alice.wait_connected()
    new, other = peers("alice2"), peers("other")
    new.wait_connected()
    other.wait_connected()
    seen = deposits_by_mailbox(relay_proc)
    link = alice.call("devices.link")["link"]
    assert alice.proc is not None
    alice.proc.proc.send_signal(signal.SIGSTOP)
    try:
        new.call("devices.join", {"link": link})
        new.wait_for(lambda: len(seen()) == 1, "the first request", 60)
        other.call("devices.join", {"link": link})
        other.wait_for(lambda: len(seen()) == 2, "the second request", 60)
        assert len(set(seen())) == 1  # both in the link mailbox, none fetched yet
    finally:
        alice.proc.proc.send_signal(signal.SIGCONT)
    refused = wait_state(other, "failed")
    assert refused["reason"] == "this link was already used"
    assert wait_state(new, "code")["code"] is not None
    wait_state(alice, "code")  # E's after it fetched N's reveal: a poll after N's "code"
