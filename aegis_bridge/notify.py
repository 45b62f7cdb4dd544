"""What the bridge shows, at each privacy level, and the two ways it shows it: the session
D-Bus (org.freedesktop.Notifications, through dbus-fast) or a command (--exec)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from aegis_client import Event, safe_text

LEVELS = ("none", "sender", "text")
#: The events that make a notification, and the one that closes a notification (a message
#: with a disappearing timer that expired).
TYPES = ["message.received", "contact.request", "group.message", "group.invitation",
         "message.expired"]  # fmt: skip
#: Notifications of disappearing messages kept open, by message id, to close at expiry.
MAX_TRACKED = 256
APP_NAME = "AegisLink"
BUS_NAME = "org.freedesktop.Notifications"
OBJECT_PATH = "/org/freedesktop/Notifications"
NOTIFY_TIMEOUT = 10.0
EXEC_TIMEOUT = 30.0
MAX_BODY = 1000  # characters of a message shown in a notification


@dataclass(frozen=True)
class Notification:
    summary: str
    body: str
    category: str
    #: A message with a disappearing timer: the notification's expiry (ms; -1: the server's
    #: default) and the message it shows, closed when the message expires.
    expire_ms: int = -1
    message_id: str | None = None


def _timer_ms(ev: Event) -> int:
    """A message's disappearing timer in ms (at least 1), or -1 for none: its notification
    closes after at most that long, the least time the message itself lasts (it runs once the
    message is read)."""
    timer = ev.data.get("timer")
    if not isinstance(timer, int) or isinstance(timer, bool) or timer <= 0:
        return -1
    return min(timer, 2**31 // 1000 - 1) * 1000


def _clean(s: Any) -> str:
    """A bounded rendering of a peer-supplied text with its lines kept and every control
    and bidi character shown visibly (aegis_client.safe_text). Markup is escaped later,
    only for a server that reads it (DBusNotifier.show). Cut after rendering (a character
    can become ten), on a boundary; D-Bus carries UTF-8, whatever our own output takes."""
    return safe_text.cut(safe_text.lines(str(s)[:MAX_BODY], ascii_only=False), MAX_BODY)


def _name(s: Any) -> str:
    """A peer-chosen name for a summary line: one line, at most 64 characters."""
    return safe_text.one_line(" ".join(str(s).split()), limit=64, ascii_only=False)


def _member(ev: Event) -> str:
    """Who sent a group message: the contact's name, or "a member" for a member known only
    through the group (its key says nothing to a reader)."""
    contact = ev.data.get("from_contact")
    return _name(contact) if isinstance(contact, str) and contact else "a member"


def render(ev: Event, level: str, group_name: str | None = None) -> Notification | None:
    """The notification for ``ev`` at ``level`` (none: no sender, no text), or None.
    ``group_name``: the name of a group message's group (the event carries only its
    reference; the bridge asks the daemon, and only above level none)."""
    if ev.type == "message.received":
        expire, mid = _timer_ms(ev), ev.data.get("message_id")
        tracked = mid if expire > 0 and isinstance(mid, str) else None
        if level == "none":
            summary, body = "New message", ""
        elif level == "sender":
            summary, body = f"New message from {_name(ev.data.get('contact', ''))}", ""
        else:
            summary = _name(ev.data.get("contact", ""))
            body = _clean(ev.data.get("text", ""))
        return Notification(summary, body, "im.received", expire, tracked)
    if ev.type == "group.message":
        # its timer as a contact's message's: the notification expires and is closed alike
        expire, mid = _timer_ms(ev), ev.data.get("message_id")
        tracked = mid if expire > 0 and isinstance(mid, str) else None
        # At level none a group message is a message like any other: nothing says "group".
        if level == "none":
            return Notification("New message", "", "im.received", expire, tracked)
        where = _name(group_name) if group_name else "a group"
        if level == "sender":
            return Notification(f"New message from {_member(ev)} in {where}", "", "im.received",
                                expire, tracked)  # fmt: skip
        return Notification(f"{_member(ev)} in {where}", _clean(ev.data.get("text", "")),
                            "im.received", expire, tracked)  # fmt: skip
    if ev.type == "contact.request":
        if level == "none":
            return Notification("New contact request", "", "im")
        who = _name(ev.data.get("name", ""))
        return Notification(f"Contact request from {who}", "", "im")
    if ev.type == "group.invitation":
        if level == "none":
            return Notification("New group invitation", "", "im")
        who, what = _name(ev.data.get("from", "")), _name(ev.data.get("name", ""))
        return Notification(f"Group invitation from {who}: {what}", "", "im")
    return None


def redact(ev: Event, level: str, group_name: str | None = None) -> dict[str, Any]:
    """The event as --exec receives it: only what the level allows (above none, a group
    message's data gains ``group_name``)."""
    keep: dict[str, tuple[str, ...]] = {
        "none": (),
        "sender": ("contact", "name", "message_id", "request", "known", "timer",
                   "group", "from", "from_contact", "invitation", "members"),
        "text": tuple(ev.data),
    }  # fmt: skip
    data = {k: v for k, v in ev.data.items() if k in keep[level]}
    if ev.type == "group.message" and level != "none":
        data["group_name"] = group_name
    out = {"seq": ev.seq, "type": ev.type, "time_ms": ev.time_ms, "level": level, "data": data}
    n = render(ev, level, group_name)
    if n is not None:
        out["summary"], out["body"] = n.summary, n.body
    return out


def warn(message: str) -> None:
    print(f"aegis-bridge: warning: {message}", file=sys.stderr, flush=True)


class DBusNotifier:
    """org.freedesktop.Notifications.Notify on the session bus. When there is no bus or no
    notification server, it says so in one warning line and carries on (and says nothing
    more until a notification gets through again)."""

    def __init__(self, bus_address: str | None = None) -> None:
        self.bus_address = bus_address
        self._bus: Any = None
        self._warned = False
        self._markup: bool | None = None  # the server reads markup in bodies (per connection)
        self._shown: dict[str, int] = {}  # message id -> notification id (disappearing ones)

    async def _connect(self) -> Any:
        from dbus_fast.aio import MessageBus

        if self._bus is None or not self._bus.connected:
            self._bus = await asyncio.wait_for(
                MessageBus(bus_address=self.bus_address).connect(), NOTIFY_TIMEOUT
            )
            self._markup = None
        return self._bus

    async def _reads_markup(self, bus: Any) -> bool:
        """Whether the server interprets markup in bodies (the "body-markup" capability of
        the Desktop Notifications spec: then a peer's <a href> would be a link and <img> an
        image fetched). Unknown (no answer): assumed, so the body is escaped."""
        from dbus_fast import Message, MessageType

        if self._markup is None:
            try:
                reply = await asyncio.wait_for(bus.call(Message(
                    destination=BUS_NAME, path=OBJECT_PATH, interface=BUS_NAME,
                    member="GetCapabilities",
                )), NOTIFY_TIMEOUT)  # fmt: skip
                ok = reply is not None and reply.message_type != MessageType.ERROR
                self._markup = not ok or "body-markup" in list(reply.body[0])
            except Exception:
                return True  # asked again next time
        return self._markup

    def _fail(self, what: str) -> None:
        if not self._warned:
            warn(f"{what}: notifications are not shown until one is available")
            self._warned = True

    async def show(self, n: Notification) -> bool:
        from dbus_fast import Message, MessageType, Variant

        try:
            bus = await self._connect()
        except Exception as exc:
            self._bus = None
            self._fail(f"no session D-Bus to show notifications on ({type(exc).__name__})")
            return False
        hints = {"category": Variant("s", n.category)}
        summary, body = n.summary, n.body
        if await self._reads_markup(bus):
            # The summary carries the peer's name: a server that reads markup in bodies may
            # read it there too. Escaping grows the text (up to 5 times): cut it again after.
            summary = safe_text.markup_escaped(summary)
            body = safe_text.cut(safe_text.markup_escaped(body), MAX_BODY)
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=BUS_NAME,
            member="Notify",
            signature="susssasa{sv}i",
            body=[APP_NAME, 0, "", summary, body, [], hints, n.expire_ms],
        )
        try:
            reply = await asyncio.wait_for(bus.call(msg), NOTIFY_TIMEOUT)
        except Exception as exc:
            with contextlib.suppress(Exception):
                bus.disconnect()
            self._bus = None
            self._fail(f"the session D-Bus failed ({type(exc).__name__})")
            return False
        if reply is None or reply.message_type == MessageType.ERROR:
            name = getattr(reply, "error_name", None) or "no reply"
            self._fail(f"no notification server on the session D-Bus ({BUS_NAME}: {name})")
            return False
        self._warned = False
        if n.message_id is not None and reply.body and isinstance(reply.body[0], int):
            self._shown[n.message_id] = reply.body[0]
            while len(self._shown) > MAX_TRACKED:  # the oldest have timed out by now, or will
                del self._shown[next(iter(self._shown))]
        return True

    async def close_message(self, message_id: Any) -> None:
        """The message expired: its notification, if still shown, is closed."""
        from dbus_fast import Message

        nid = self._shown.pop(message_id, None) if isinstance(message_id, str) else None
        if nid is None or self._bus is None:
            return
        with contextlib.suppress(Exception):  # gone already, or no server: nothing to close
            await asyncio.wait_for(self._bus.call(Message(
                destination=BUS_NAME, path=OBJECT_PATH, interface=BUS_NAME,
                member="CloseNotification", signature="u", body=[nid],
            )), NOTIFY_TIMEOUT)  # fmt: skip

    async def close(self) -> None:
        if self._bus is not None:
            with contextlib.suppress(Exception):
                self._bus.disconnect()
            self._bus = None


class ExecNotifier:
    """Runs CMD once per event with the (redacted) event as JSON on its standard input."""

    def __init__(self, command: str) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("--exec needs a command")

    async def run(self, payload: dict[str, Any]) -> bool:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
            )
        except OSError as exc:
            warn(f"--exec: cannot run {self.argv[0]}: {exc.strerror}")
            return False
        try:
            await asyncio.wait_for(
                proc.communicate(json.dumps(payload).encode() + b"\n"), EXEC_TIMEOUT
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            warn(f"--exec: {self.argv[0]} did not finish within {EXEC_TIMEOUT:g} s")
            return False
        if proc.returncode != 0:
            warn(f"--exec: {self.argv[0]} exited with status {proc.returncode}")
            return False
        return True
