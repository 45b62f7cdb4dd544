"""Processes by parentage, from /proc (Linux): the managed Tor is a child of its daemon, and
obfs4proxy a child of that Tor. Standard library only."""

from __future__ import annotations

import os
from pathlib import Path


def children(pid: int, program: str | None = None) -> list[int]:
    """The pids whose parent is ``pid`` (and, if given, whose name is ``program``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid and (program is None or comm == program):
            found.append(int(entry))
    return sorted(found)


def child(pid: int, program: str) -> int | None:
    """The one child of ``pid`` named ``program``, or None."""
    found = children(pid, program)
    return found[0] if found else None


def tor_control(home: Path, line: str) -> list[str]:
    """One command on a profile's managed Tor, over its control socket with its cookie (as
    the same user): a test looks at the running Tor, not at the daemon's idea of it."""
    import asyncio

    from aegisd.transport.torcontrol import TorControl

    async def go() -> list[str]:
        c = await TorControl.connect(home / "tor" / "control")
        try:
            await c.authenticate()
            return list((await c.checked(line)).lines)
        finally:
            await c.close()

    return asyncio.run(go())
