"""The `aegis` messaging commands as a user runs them: a real relay, two real daemons, and the
CLI as a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.functional.conftest import Peer


def aegis(peer: Peer | Path | str, *args: str, input: str | None = None) -> Any:
    home = peer.home if isinstance(peer, Peer) else peer
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        check=False,
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("aegis: error: ")
    return lines[0]


def established(peer: Peer, name: str) -> bool:
    contacts = json.loads(ok(aegis(peer, "contacts", "--json")))["contacts"]
    return any(c["name"] == name and c["established"] for c in contacts)


def history(peer: Peer, name: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(ok(aegis(peer, "messages", name, "--json")))["messages"]
    return out


def connect_with_cli(alice: Peer, bob: Peer) -> None:
    """Bob invites (`aegis invite`), Alice adds him (`aegis contact add`)."""
    alice.wait_connected()
    bob.wait_connected()
    r = aegis(bob, "invite")
    link = ok(r).strip()
    assert "\n" not in link and link.startswith("aegis:")
    assert "aegis contact add" in r.stderr
    out = ok(aegis(alice, "contact", "add", "bob", link))
    assert out.startswith("added bob")
    bob.wait_for(lambda: established(bob, "alice"), "the invitation to be used")
    alice.wait_for(lambda: established(alice, "bob"), "bob's answer")


def test_invite_add_send_and_read_both_ways(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect_with_cli(alice, bob)
    assert "alice  (established)" in ok(aegis(bob, "contacts"))
    # Names are matched exactly (case-sensitive: "bob" and "Bob" may be two people); a
    # name that differs in case or by a slip is suggested.
    line = one_line_error(aegis(alice, "send", "Bob", "hi"))
    assert line == (
        "aegis: error: no such contact 'Bob' (did you mean 'bob'? names are case-sensitive)"
    )
    line = one_line_error(aegis(alice, "messages", "bbo"))
    assert "no such contact 'bbo' (did you mean 'bob'?" in line

    mid = ok(aegis(alice, "send", "bob", "hello bob")).strip()
    assert re.fullmatch(r"[0-9a-f]{32}", mid)
    bob.wait_for(lambda: [m for m in history(bob, "alice") if m["text"] == "hello bob"], "hello")
    got = [m for m in history(bob, "alice") if m["message_id"] == mid]
    assert got and got[0]["direction"] == "in"

    # MESSAGE "-" reads standard input (one trailing newline dropped, inner ones kept).
    r = aegis(bob, "send", "alice", "-", "--json", input="line one\nline two\n")
    sent = json.loads(ok(r))
    assert sent["status"] == "queued"
    alice.wait_for(
        lambda: [m for m in history(alice, "bob") if m["text"] == "line one\nline two"], "reply"
    )
    text = ok(aegis(alice, "messages", "bob"))
    assert "me -> bob: hello bob" in text
    assert "bob: line one\n    line two" in text
    assert ok(aegis(alice, "messages", "bob", "--limit", "1")).count("\n") == 2  # 2 lines, 1 msg

    # Mark read, then bob sees the read receipt (after its random delay).
    ok(aegis(bob, "messages", "alice", "--mark-read"))
    alice.wait_for(
        lambda: [m for m in history(alice, "bob") if m["status"] == "read"], "the read receipt"
    )

    # Safety numbers: the same twelve groups of five on both sides.
    a = json.loads(ok(aegis(alice, "verify", "bob", "--json")))
    b = json.loads(ok(aegis(bob, "verify", "alice", "--json", "--yes")))
    assert a["safety_number"] == b["safety_number"] and len(a["safety_number"]) == 60
    assert a["verified"] is False and b["verified"] is True
    r = aegis(alice, "verify", "bob", input="n\n")
    assert "not marked verified" in ok(r)
    groups = re.findall(r"\b\d{5}\b", r.stdout)
    assert "".join(groups) == a["safety_number"]
    r = aegis(alice, "verify", "bob", input="y\n")
    assert "bob is marked verified" in ok(r)
    assert "verified" in ok(aegis(alice, "contacts"))


def test_qr_name_address_requests(peers: Callable[[str], Peer]) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    for p in (alice, bob, carol):
        p.wait_connected()
    out = ok(aegis(alice, "invite", "--qr", "--expires", "600"))
    *qr, link = out.strip().splitlines()
    assert link.startswith("aegis:") and len(qr) > 10 and "█" in "".join(qr)
    assert ok(aegis(alice, "name", "Alice Liddell")).strip() == "display name: Alice Liddell"

    # The invitation is listed until used; a revoked one is gone.
    inv = json.loads(ok(aegis(alice, "invitations", "--json")))["invitations"]
    assert len(inv) == 1 and inv[0]["invitation"] in ok(aegis(alice, "invitations"))
    # Every time in JSON is in ms since the epoch (expires_at was in seconds).
    assert abs(inv[0]["expires_at"] - (time.time() + 600) * 1000) < 120_000
    second = json.loads(ok(aegis(alice, "invite", "--json")))
    listed = json.loads(ok(aegis(alice, "invitations", "--json")))["invitations"]
    assert listed[-1]["invitation"] == second["invitation"]  # oldest first, like every list
    assert listed[-1]["expires_at"] == second["expires_at"]
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(second["expires_at"] / 1000))
    assert f"{second['invitation']}  valid until {until}" in ok(aegis(alice, "invitations"))
    ok(aegis(alice, "invitations", "--revoke", second["invitation"]))
    ok(aegis(alice, "invitations", "--revoke", inv[0]["invitation"]))
    assert ok(aegis(alice, "invitations")).strip() == "no unused invitations"
    one_line_error(aegis(alice, "invitations", "--revoke", inv[0]["invitation"]))

    out = ok(aegis(alice, "settings", "--read-receipts", "off", "--receipt-delay-max", "1"))
    assert out.startswith("read receipts: off\nreceipt delay: 0.5 to 1 s\nlevel: ")
    # The privacy level and what each level costs are part of the settings.
    assert "default" in out and "a message waits" in out and "aegis privacy --level" in out
    got = json.loads(ok(aegis(alice, "settings", "--json")))
    assert (got["read_receipts"], got["receipt_delay_max"]) == (False, 1.0)
    assert got["privacy"]["level"] in ("off", "default", "strong")

    addr = ok(aegis(alice, "address")).strip()
    assert addr.startswith("aegis:")
    assert ok(aegis(alice, "requests")).strip() == "no pending requests"
    ok(aegis(bob, "contact", "add", "alice", addr))
    ok(aegis(carol, "contact", "add", "alice", addr))
    reqs = alice.wait_for(
        lambda: (lambda rs: rs if len(rs) == 2 else None)(
            json.loads(ok(aegis(alice, "requests", "--json")))["requests"]
        ),
        "two requests",
    )
    by_name = {r["name"]: r["request"] for r in reqs}
    assert set(by_name) == {"bob", "carol"}
    listing = ok(aegis(alice, "requests"))
    assert f"{by_name['bob']}  bob" in listing
    assert ok(aegis(alice, "accept", str(by_name["bob"]), "--name", "Bob B.")).startswith(
        "accepted: Bob B."
    )
    ok(aegis(alice, "reject", str(by_name["carol"])))
    assert ok(aegis(alice, "requests")).strip() == "no pending requests"
    line = one_line_error(aegis(alice, "accept", str(by_name["carol"])))
    assert "no such request" in line
    bob.wait_for(lambda: established(bob, "alice"), "acceptance")
    ok(aegis(bob, "send", "alice", "via the address"))
    alice.wait_for(
        lambda: [m for m in history(alice, "Bob B.") if m["text"] == "via the address"], "msg"
    )
    # Rotation: a new link, the old one leads nowhere.
    new = ok(aegis(alice, "address", "--rotate")).strip()
    assert new != addr
    one_line_error(aegis(carol, "contact", "add", "alice2", addr))


def test_errors_are_one_line(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    alice = peers("alice")
    alice.wait_connected()
    line = one_line_error(aegis(alice, "send", "nobody", "hi"))
    assert line == "aegis: error: no such contact 'nobody' (aegis contacts lists them)"
    r = aegis(alice, "send", "nobody", "hi", "--json")
    assert r.returncode == 1
    # One shape: the daemon's JSON-RPC error object (code and data as sent), message as above.
    assert json.loads(r.stdout) == {"error": {
        "code": 1020, "message": line.removeprefix("aegis: error: "),
        "data": {"error": "not_found"}}}  # fmt: skip
    line = one_line_error(aegis(alice, "contact", "add", "x", "aegis:AAAA"))
    assert "not a valid AegisLink link" in line
    line = one_line_error(aegis(alice, "contact", "add", "x", "not a link at all"))
    assert "not a valid AegisLink link" in line
    one_line_error(aegis(alice, "send", "nobody", "-", input=""))  # empty message
    one_line_error(aegis(alice, "messages", "nobody"))
    one_line_error(aegis(alice, "verify", "nobody", "--yes"))
    one_line_error(aegis(alice, "invite", "--expires", "5"), 2)  # usage error
    one_line_error(aegis(alice, "accept", "notanumber"), 2)

    # The daemon is not running: exit 3, and the line names the command that starts it.
    stopped = tmp_short / "stopped"
    ok(aegis(stopped, "init", "--no-passphrase"))
    for args in (("send", "bob", "hi"), ("invite",), ("contacts",), ("messages", "bob")):
        line = one_line_error(aegis(stopped, *args), 3)
        assert f"aegis daemon --home {stopped}" in line
