"""docs/protocol.md §25 against aegisd/core: the tables an implementer reads (change ops and
their sizes, payload types, forbidden characters) are the code's."""

from __future__ import annotations

import re
from pathlib import Path

from aegisd.core import group as g
from aegisd.core import wire
from tests.support.groups import PEOPLE, group_of

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def section(heading: str) -> str:
    m = re.search(rf"^(#+) {re.escape(heading)}.*$", DOC, re.M)
    assert m, heading
    end = re.compile(rf"^#{{1,{len(m.group(1))}}} ", re.M).search(DOC, m.end())
    return DOC[m.end() : end.start() if end else len(DOC)]


def rows(text: str, first: str) -> list[list[str]]:
    out, inside = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if not inside:
            inside = cells[0] == first
        elif not set(cells[0]) <= {"-", ":"}:
            out.append(cells)
    return out


def test_change_table_is_the_encoder() -> None:
    table = {int(r[0].strip("`")): (r[1], r[3]) for r in rows(section("25.3 Changes"), "op")}
    ops = {"add": wire.CHANGE_ADD, "remove": wire.CHANGE_REMOVE, "role": wire.CHANGE_ROLE,
           "rename": wire.CHANGE_RENAME, "leave": wire.CHANGE_LEAVE}  # fmt: skip
    assert {v: k for k, v in ops.items()} == {op: name for op, (name, _) in table.items()}
    assert set(table) == set(wire.GROUP_CHANGE_OPS)
    log, (owner, admin) = group_of([wire.ROLE_ADMIN])
    state = log.head
    sizes = {
        wire.CHANGE_ADD: g.add_member(owner, state, PEOPLE[5].public),
        wire.CHANGE_REMOVE: g.remove_member(owner, state, admin.public.ed_pub),
        wire.CHANGE_ROLE: g.set_role(owner, state, admin.public.ed_pub, wire.ROLE_MEMBER),
        wire.CHANGE_LEAVE: g.leave(admin, state),
    }
    for op, change in sizes.items():
        assert table[op][1] == str(len(change.to_bytes())), op
    shortest = g.rename(owner, state, "x", "")
    longest = g.rename(owner, state, "x" * 128, "y" * 1024)
    low, high = (int(n.replace(",", "")) for n in re.findall(r"[\d,]+", table[4][1]))
    assert (low, high) == (len(shortest.to_bytes()), len(longest.to_bytes()))


def test_payload_table_is_the_code() -> None:
    documented = {int(r[0].strip("`"), 16) for r in rows(section("25.8 Payloads"), "Type")}
    code = {v for k, v in vars(wire).items() if k.startswith("PAYLOAD_GROUP_")}
    assert documented == code


def test_forbidden_characters_are_the_code() -> None:
    text = section("25.1 State")
    listed = re.search(r"\*\*Forbidden characters\*\*.*?:(.*?)\. A local", text, re.S)
    assert listed
    chars: set[str] = set()
    for part in listed.group(1).replace("\n", " ").split(","):
        ends = [int(h, 16) for h in re.findall(r"U\+([0-9A-F]{4})", part)]
        chars |= {chr(c) for c in range(ends[0], ends[-1] + 1)}
    assert frozenset(chars) == wire._FORBIDDEN_TEXT


def test_roles_and_limits_named_in_the_text() -> None:
    text = section("25.1 State")
    assert "Roles: `1` member, `2` admin, `3` owner." in text.replace("\n", " ")
    assert (wire.ROLE_MEMBER, wire.ROLE_ADMIN, wire.ROLE_OWNER) == (1, 2, 3)
    assert f"1 to {wire.MAX_GROUP_MEMBERS} (`MAX_GROUP_MEMBERS`)" in text
    five = section("25.5 The concurrency rule")
    assert f"`MAX_HELD` = {g.MAX_HELD}" in five and f"`HOLD_AHEAD` = {g.HOLD_AHEAD}" in five
    assert f"window is {g.CONTEST_WINDOW} versions" in five
