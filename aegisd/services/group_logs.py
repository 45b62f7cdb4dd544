"""Every group's parsed log, kept between calls for the callers that show many groups at once
(``conversations.list``, ``messages.search``).

Parsing a group's log verifies each member's identity binding and each change of its chain,
so parsing every group's on every call made ``conversations.list`` cost signature checks in
proportion to all the groups' members, each time. Here a log is parsed again only when its
stored bytes changed (compared whole: a cheap comparison beside a parse); a group deleted
goes from here at the next call. Held in memory while unlocked only (``clear`` at lock): what
it holds (names, members' keys) is what the store holds, decrypted.

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
        #: group reference: (the stored log's bytes, what was parsed from them)
        self._parsed: dict[int, tuple[bytes, Parsed]] = {}
        #: how many logs were parsed (the cache's misses), for tests and benchmarks
        self.parses = 0

    def all(self, store: Store) -> dict[int, Parsed]:
        """Every group's name, log and creation time, by reference."""
        fresh: dict[int, tuple[bytes, Parsed]] = {}
        for row in G.list_groups(store):
            hit = self._parsed.get(row.id)
            if hit is None or hit[0] != row.log:
                log = core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))
                self.parses += 1
                hit = (row.log, Parsed(log.head.name, log, row.created_at))
            fresh[row.id] = hit
        self._parsed = fresh
        return {ref: parsed for ref, (_, parsed) in fresh.items()}

    def clear(self) -> None:
        self._parsed = {}
