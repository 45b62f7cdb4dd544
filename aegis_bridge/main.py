"""aegis-bridge: desktop notifications for AegisLink, through the daemon's events.

    aegis-bridge [--home DIR] [--level none|sender|text] [--exec CMD]

Private by default: at ``--level none`` a notification says "New message" and nothing else
(no sender, no text, not even whether it came in a group); ``sender`` adds the contact's name
(and for a group message the group's name); ``text`` adds the message text too. Group
invitations are shown as "New group invitation", above level none with the inviter and the
group's name.
Notifications go to org.freedesktop.Notifications on the session D-Bus, or, with ``--exec
CMD``, to CMD, run once per event with the event as JSON on its standard input (with only what
the level allows). The bridge imports no cryptography: it is a client of aegisd (through
aegis_client), which keeps the keys.

It follows the daemon across restarts: the last event it handled is kept in the profile
directory (``bridge.seq``, mode 0600) and it resubscribes from there, so nothing is shown twice
or missed, even across its own restarts. Its log lines name no contact and quote no text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from aegis_client import AegisClientError, Client, Event, EventStream, InvalidParams
from aegisd.paths import PathError, resolve

from .notify import LEVELS, TYPES, DBusNotifier, ExecNotifier, redact, render, warn

STATE_NAME = "bridge.seq"


def load_seq(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def save_seq(path: Path, seq: int) -> None:
    """Atomically, mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{seq}\n")
    os.replace(tmp, path)


class Bridge:
    def __init__(self, home: str | None, level: str, exec_cmd: str | None) -> None:
        self.paths = resolve(home)
        self.level = level
        self.state = self.paths.home / STATE_NAME
        self.exec = ExecNotifier(exec_cmd) if exec_cmd else None
        self.dbus = None if self.exec else DBusNotifier()
        self.busy = False  # an event is being shown
        self.stop_requested = False

    async def group_name(self, client: Client, ev: Event) -> str | None:
        """The name of a group message's group, asked of the daemon (the event names the group
        by its reference only); None at level none (never shown) or when the group is gone."""
        if ev.type != "group.message" or self.level == "none":
            return None
        ref = ev.data.get("group")
        if not isinstance(ref, int) or isinstance(ref, bool):
            return None
        try:
            name = (await client.group(ref)).get("name")
        except AegisClientError:
            return None  # left or deleted since (an old event, after a restart)
        return name if isinstance(name, str) else None

    async def handle(self, client: Client, ev: Event) -> None:
        if ev.type == "message.expired":
            # Not a notification: it closes the expired message's (--exec: not run; the
            # command was given the timer, data.timer, at level sender and text).
            if self.dbus is not None:
                await self.dbus.close_message(ev.data.get("message_id"))
            return
        group_name = await self.group_name(client, ev)
        if self.exec is not None:
            await self.exec.run(redact(ev, self.level, group_name))
            return
        n = render(ev, self.level, group_name)
        if n is not None and self.dbus is not None:
            await self.dbus.show(n)

    async def _start(self, stream: EventStream) -> None:
        start = asyncio.ensure_future(stream.start())
        done, _ = await asyncio.wait({start}, timeout=2.0)
        if not done:
            warn(
                f"waiting for aegisd on {self.paths.socket} (not running yet, or locked: "
                "aegis unlock)"
            )
        await start

    async def run(self) -> int:
        client = Client(self.paths.socket)
        since = load_seq(self.state)
        stream = client.events(types=TYPES, since=since)
        try:
            try:
                await self._start(stream)
            except InvalidParams:
                # The saved position is beyond this profile's events (a new profile in the
                # same place): start from now.
                warn(f"{self.state} does not match this profile; starting from now")
                stream = client.events(types=TYPES)
                await self._start(stream)
            print(f"aegis-bridge: listening (level: {self.level})", file=sys.stderr, flush=True)
            async for ev in stream:
                # A stop request waits for the event in hand to be shown and recorded, so the
                # next start neither repeats it nor skips it.
                self.busy = True
                try:
                    await self.handle(client, ev)
                    save_seq(self.state, ev.seq)
                finally:
                    self.busy = False
                if self.stop_requested:
                    break
            return 0
        finally:
            await stream.aclose()
            await client.close()
            if self.dbus is not None:
                await self.dbus.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aegis-bridge", description="Desktop notifications for AegisLink."
    )
    p.add_argument("--home", help="profile directory (default: AEGIS_HOME, else XDG dirs)")
    p.add_argument(
        "--level",
        choices=LEVELS,
        default="none",
        help="what a notification shows: none (the default: 'New message' only), sender "
        "(the contact's name, and a group message's group), text (those and the message text)",
    )
    p.add_argument(
        "--exec",
        metavar="CMD",
        dest="exec_cmd",
        help="instead of D-Bus, run CMD for each event with it as JSON on standard input",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        bridge = Bridge(args.home, args.level, args.exec_cmd)
    except (PathError, ValueError) as exc:
        print(f"aegis-bridge: error: {exc}", file=sys.stderr)
        sys.exit(2)

    async def main_task() -> int:
        task = asyncio.ensure_future(bridge.run())
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if not bridge.busy or bridge.stop_requested:  # a second signal does not wait
                task.cancel()
            bridge.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return 0

    sys.exit(asyncio.run(main_task()))


if __name__ == "__main__":
    main()
