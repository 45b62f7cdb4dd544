"""The parsed group logs conversations.list and messages.search use (services/group_logs.py),
on a real SQLCipher store with real signed logs: a log is parsed once, and again only when its
stored bytes change; a deleted group goes; lock clears them (issue 17: conversations.list
parsed every group's log on every call)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aegisd.core import group as core
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.daemon import Daemon
from aegisd.paths import ProfilePaths
from aegisd.services.group_logs import GroupLogs
from aegisd.store import KdfParams, Store, create_profile
from aegisd.store import groups as G

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


def _group(store: Store, name: str, members: int) -> tuple[int, IdentityKeyPair, core.GroupLog]:
    entropy = SystemEntropy()
    owner = IdentityKeyPair.generate(entropy)
    log = core.GroupLog(core.create_group(entropy, owner, name))
    for _ in range(members - 1):
        log.receive(core.add_member(owner, log.head, IdentityKeyPair.generate(entropy).public))
    rows = [(m.key, m.role) for m in log.head.members]
    return G.add_group(store, log.head.group_id, log.record().to_bytes(), rows), owner, log


def test_each_log_is_parsed_once_and_again_only_when_it_changes(tmp_path: Path) -> None:
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        refs = {}
        for name in ("one", "two", "three"):
            ref, owner, log = _group(store, name, 4)
            refs[name] = (ref, owner, log)
        logs = GroupLogs()
        first = logs.all(store)
        assert {ref: p.name for ref, p in first.items()} == {
            r: n for n, (r, _, _) in refs.items()}  # fmt: skip
        assert all(len(p.log.head.members) == 4 for p in first.values())
        assert logs.parses == 3
        for _ in range(5):  # the calls after the first parse nothing
            again = logs.all(store)
            assert {r: p.log for r, p in again.items()} == {r: p.log for r, p in first.items()}
        assert logs.parses == 3

        # One group renamed (its stored log changes): that one is parsed again, and shows it.
        ref, owner, log = refs["two"]
        log.receive(core.rename(owner, log.head, "deux", ""))
        G.put_log(store, ref, log.record().to_bytes(), [(m.key, m.role) for m in log.head.members])
        got = logs.all(store)
        assert logs.parses == 4 and got[ref].name == "deux"

        # One deleted: gone from the next call (and not kept).
        gone = refs["one"][0]
        with store.transaction():
            G.delete_group(store, gone)
        assert gone not in logs.all(store) and logs.parses == 4

        # Lock: nothing kept; the next unlock parses anew.
        logs.clear()
        assert set(logs.all(store)) == {refs["two"][0], refs["three"][0]}
        assert logs.parses == 6
    finally:
        store.close()


def test_a_row_id_reused_for_a_group_made_again_is_not_taken_from_the_cache(
    tmp_path: Path,
) -> None:
    """SQLite reuses the row id of the last group deleted: the same group deleted and made
    again (its log unchanged, bytes equal) is a new row with its own creation time, which
    conversations.list shows; the cache must not hand out the old one (finding L5)."""
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        ref, _, log = _group(store, "again", 2)
        logs = GroupLogs()
        before = logs.all(store)[ref].created_at
        with store.transaction():
            G.delete_group(store, ref)
        members = [(m.key, m.role) for m in log.head.members]
        again = G.add_group(store, log.head.group_id, log.record().to_bytes(), members)
        assert again == ref  # the id is reused: the case at hand
        # Made later (set here, not waited for): another time than the first.
        store.query("UPDATE groups SET created_at = ? WHERE id = ?", (before + 60_000, again))
        assert logs.all(store)[ref].created_at == before + 60_000
        assert logs.parses == 2
    finally:
        store.close()


def test_a_lock_clears_the_parsed_logs(tmp_path: Path) -> None:
    """A real in-process daemon (no relay configured): the messenger's parsed logs (names,
    members' keys, decrypted) do not outlive a lock; the next unlock parses anew (L6)."""
    home = tmp_path / "p"
    create_profile(home, None, FAST).close()
    paths = ProfilePaths(home, tmp_path / "sock", True)

    async def go() -> tuple[int, int, int]:
        d = Daemon(paths)
        await d.unlock(None)
        try:
            assert d.store is not None
            _group(d.store, "kept", 3)
            logs = d.messenger.group_logs
            assert len(logs.all(d.store)) == 1
            parsed = logs.parses
            await d.lock()
            held = len(logs._parsed)
            await d.unlock(None)
            assert d.store is not None
            logs.all(d.store)
            return parsed, held, logs.parses
        finally:
            await d.lock()
            await d.events.close()

    parsed, held, after = asyncio.run(go())
    assert parsed == 1 and held == 0 and after == 2
