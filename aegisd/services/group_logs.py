"""Every group's parsed log, kept between calls for the callers that show many groups at once
(``conversations.list``, ``messages.search``).

Parsing a group's log verifies each member's identity binding and each change of its chain,
so parsing every group's on every call made ``conversations.list`` cost signature checks in
proportion to all the groups' members, each time. Here a log is parsed again only when its
stored bytes changed (compared whole: a cheap comparison beside a parse); a group deleted
goes from here at the next call; a row id reused for another group (or for the same one,
deleted and made again) is parsed anew (the group id and creation time are compared too).
Held in memory while unlocked only (``clear`` at lock): what it holds (names, members' keys)
is what the store holds, decrypted.

The logs handed out are shared: callers read them, never change them.
"""

from __future__ import annotations

from typing import NamedTuple

from aegisd.core import group as core
from aegisd.core import wire
from aegisd.store import Store
from aegisd.store import groups as G


class Parsed(NamedTuple):
    name: str
    log: core.GroupLog
    created_at: int  # when the group was made here (ms)


class GroupLogs:
    def __init__(self) -> None:
        #: group reference: ((group id, creation time, the stored log's bytes), what was
        #: parsed from them). A reference is a row id, which SQLite reuses after a delete: a
        #: group deleted and made again (the same log bytes) is another row, with its own time.
        self._parsed: dict[int, tuple[tuple[bytes, int, bytes], Parsed]] = {}
        #: how many logs were parsed (the cache's misses), for tests and benchmarks
        self.parses = 0

    def all(self, store: Store) -> dict[int, Parsed]:
        """Every group's name, log and creation time, by reference."""
        fresh: dict[int, tuple[tuple[bytes, int, bytes], Parsed]] = {}
        for row in G.list_groups(store):
            stored = (row.group_id, row.created_at, row.log)
            hit = self._parsed.get(row.id)
            if hit is None or hit[0] != stored:
                log = core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))
                self.parses += 1
                hit = (stored, Parsed(log.head.name, log, row.created_at))
            fresh[row.id] = hit
        self._parsed = fresh
        return {ref: parsed for ref, (_, parsed) in fresh.items()}

    def clear(self) -> None:
        self._parsed = {}
