"""The ``aegis chat`` application: the conversation list, the open conversation, the compose
box and the status line, kept current by the daemon's event stream.

The event stream is followed by ``follow_events`` with its cursor: when the daemon stops the
status line says so, the stream is opened again with back-off, and it resumes after the last
event handled, so no message is missed or shown twice. Every error path ends inside Textual's
run loop, which restores the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, ClassVar, Literal

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import ListView, Static
from textual.worker import WorkerFailed

from aegis_client import (
    AegisClientError,
    Client,
    ConnectionLost,
    DaemonNotRunning,
    Event,
    InvalidParams,
    Locked,
    RevealsIp,
    WrongPassphrase,
)
from aegis_client.qr import QRUnavailable, qr_text

from . import menus, render
from .model import Conversation, contact_key, group_key, load_conversations
from .screens import (
    AskScreen,
    CallScreen,
    HelpScreen,
    InfoScreen,
    LinkScreen,
    SearchScreen,
    picked_emoji,
    react_prompt,
)
from .widgets import Compose, ConversationItem, DaySeparator, MessageLog, MessageRow

#: Back-off between attempts to reach a stopped daemon (seconds), as aegis_client's.
FIRST_DELAY = 0.05
MAX_DELAY = 2.0
#: Events after which the list is loaded again (a contact or group came, went or changed).
GROUP_CHANGES = ("group.changed", "group.invitation")
#: message.status events kept for rows not shown yet.
EARLY_MAX = 256
#: Messages per history page.
PAGE = 50
#: How long after sending one's own message it can still be edited (the daemon's rule), ms.
EDIT_WINDOW_MS = 24 * 3600 * 1000
#: Least seconds between two messages.typing calls (the daemon sends at most one per 5 s).
TYPING_EVERY = 1.0
#: Search hits shown.
SEARCH_LIMIT = 50
#: Actions of the main screen only (not while a dialog is open): every priority binding's but
#: quit (a priority key reaches the app past a dialog: Alt+X would ask over "Remove bob?", Alt+E
#: replace the hidden draft), and those that open a dialog.
#: The worker group of the user's actions (``act``), apart from typing and event workers.
ACTION_WORKERS = "action"
MAIN_SCREEN_ONLY = ("groups", "start_call", "remove_contact", "settings", "reply", "edit",
                    "delete_message", "react", "devices")  # fmt: skip
#: The note of an action the daemon went away in the middle of.
#: The note of an action the daemon went away in the middle of (it may have done it before the
#: link broke: the user looks before doing it again).
NOT_REACHABLE = "daemon not reachable: the action may not be done (check once it is back)"

CSS = """
#main { height: 1fr; }
#convs { width: 32; min-width: 24; border-right: solid $primary-darken-2; }
#right { width: 1fr; }
#title { height: 1; background: $primary-darken-3; }
#log { height: 1fr; }
MessageRow { height: auto; margin: 0 0 1 0; }
MessageRow .head { text-style: bold; }
MessageRow .text { padding-left: 2; }
MessageRow .quote { padding-left: 2; color: $text-muted; }
MessageRow .reacts { padding-left: 2; color: $accent; }
MessageRow.selected { background: $boost; border-left: thick $accent; }
#context { height: auto; max-height: 2; color: $text-muted; display: none; }
#search { width: 90%; height: 90%; border: round $accent; background: $surface; padding: 0 1; }
#search-results { height: 1fr; }
#info-box { width: 90%; height: auto; max-height: 90%; border: round $accent;
    background: $surface; padding: 0 1; }
MessageRow.out .head { color: $text-muted; }
DaySeparator { color: $accent; text-align: center; }
#compose { height: 4; }
#status { height: 1; background: $primary-darken-3; }
#help-box { width: 90%; height: auto; max-height: 90%; border: round $accent;
    background: $surface; padding: 0 1; }
#ask { width: 80%; height: auto; border: round $accent; background: $surface; padding: 0 1; }
HelpScreen, AskScreen, InfoScreen, CallScreen, SearchScreen, LinkScreen {
    align: center middle; }
CallScreen #info { width: 90%; height: auto; border: round $accent; background: $surface;
    padding: 0 1; }
"""


def _error_text(exc: BaseException) -> str:
    # The daemon's messages name no secret (docs/api.md); still shown as inert text.
    return render.name(str(exc) or type(exc).__name__, 200)


class ChatApp(App[None]):
    CSS = CSS
    ENABLE_COMMAND_PALETTE = False  # its commands (themes, screenshots) are not this client's
    TITLE = "aegis chat"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1,question_mark", "help", "help", priority=False),
        Binding("ctrl+g", "jump", "jump"),
        Binding("ctrl+r", "requests", "requests"),
        Binding("ctrl+o", "invite", "invitation"),
        Binding("ctrl+t", "add_contact", "add contact"),
        Binding("ctrl+l", "unlock", "unlock"),
        Binding("f2", "rename", "rename"),
        Binding("ctrl+b", "block", "block"),
        Binding("ctrl+s", "safety", "safety number"),
        Binding("ctrl+f", "send_file", "send a file"),
        Binding("f4", "save_file", "save a file"),
        Binding("alt+g", "groups", "groups", priority=True),
        Binding("ctrl+p", "start_call", "call"),
        Binding("alt+d", "remove_contact", "remove the contact", priority=True),
        Binding("alt+v", "devices", "devices", priority=True),
        Binding("f12", "settings", "settings"),
        Binding("f8", "hang_up", "hang up"),
        Binding("f3", "search", "search"),
        Binding("f5", "timer", "disappearing timer"),
        Binding("escape", "go_back", "back"),
        # The selected message's actions: Alt keys, never a letter someone may be typing.
        Binding("alt+r", "reply", "reply", priority=True),
        Binding("alt+e", "edit", "edit", priority=True),
        Binding("alt+x", "delete_message", "delete", priority=True),
        Binding("alt+equals_sign,alt+plus", "react", "react", priority=True),
        Binding("ctrl+q", "quit", "quit", priority=True),
        Binding("q", "quit_unless_typing", "quit", show=False),
    ]

    def __init__(self, socket: Path) -> None:
        super().__init__()
        self.client = Client(socket)
        self.convs: dict[str, Conversation] = {}
        self.items: dict[str, ConversationItem] = {}
        self.open_key: str | None = None
        self.messages: list[dict[str, Any]] = []  # the open conversation's, oldest first
        self.rows: dict[str, MessageRow] = {}
        self.next_before: int | None = None
        self.early_status: dict[str, str] = {}  # message.status before send() returned
        self.locked = False
        self.has_passphrase = True
        self.unlocking = False
        self.wake = asyncio.Event()
        self.daemon_up = False
        self.relay: dict[str, Any] = {}
        self.pending_requests = 0
        self.pending_groups = 0
        #: The call under way ({"call_id", "contact", "state"}), None when there is none.
        self.call: dict[str, Any] | None = None
        #: The last event handled (the stream's cursor), for tests and the status line.
        self.cursor: int | None = None
        #: The daemon's last event when the list was loaded: the unread counts include every
        #: message event up to it (one replayed after a reload is not counted twice).
        self.counted_upto = 0
        self.subscriptions = 0
        self.ready = asyncio.Event()
        #: Why the client stopped, when an unexpected error stopped it (no text, no locals).
        self.failure: str | None = None
        #: The selected message's id (in the open conversation), for reply/react/edit/delete.
        self.selected: str | None = None
        #: The message the compose box answers (a reply) or replaces (an edit), if any.
        self.reply_to: dict[str, Any] | None = None
        self.editing: dict[str, Any] | None = None
        #: typing.config's "enabled"; contacts typing now; when messages.typing last went.
        self.typing_on = False
        self.typing: set[str] = set()
        self.typing_sent = 0.0
        self.typing_lock = asyncio.Lock()
        #: The device link shown (Alt+V, link), fed the daemon's devices.link events.
        self.link_screen: LinkScreen | None = None

    # -- an unexpected error -------------------------------------------------------------

    def _fatal_error(self) -> None:
        # Textual's own prints a traceback with every frame's locals, where a message text or
        # the passphrase may be: only the error's type and where it happened are kept.
        exc: BaseException | None = self._exception
        if isinstance(exc, WorkerFailed):  # a worker's error, wrapped without a traceback
            exc = exc.error
        where = ""
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
        name = type(exc).__name__ if exc is not None else "error"
        self.failure = f"aegis chat stopped after an unexpected {name}{where}"
        self.bell()
        self._close_messages_no_wait()

    # -- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield ListView(id="convs")
            with Vertical(id="right"):
                yield Static(render.plain("no conversation open"), id="title", markup=False)
                yield MessageLog(id="log")
                yield Static(render.plain(""), id="context", markup=False)
                yield Compose(id="compose", placeholder="Enter sends · Ctrl+N new line · F1 keys")
        yield Static(render.plain("connecting…"), id="status", markup=False)

    def on_mount(self) -> None:
        self.run_worker(self.follow_events(), name="events", exclusive=True)
        # Textual restores the terminal on its own exits only: a SIGTERM or SIGHUP (the
        # terminal closed, `kill`) ends the app the same way, so the screen is given back.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.exit)

    async def on_unmount(self) -> None:
        await self.client.close()

    # -- the status line ----------------------------------------------------------------

    def show_status(self, note: str | None = None) -> None:
        if not self.daemon_up:
            text = note or "daemon not running: reconnecting…"
        elif self.locked:
            text = "locked: Ctrl+L to unlock"
        else:
            r = self.relay
            if r.get("connected"):
                text = "relay connected"
            else:
                reason = r.get("reason")
                text = "relay not connected" + (f": {render.name(reason, 60)}" if reason else "")
            if self.call is not None:
                who = render.name(self.call.get("contact") or "?", 24)
                text += f" · call with {who}: {self.call.get('state')} (F8 hangs up)"
            if self.pending_requests:
                text += f" · {self.pending_requests} contact request(s): Ctrl+R"
            if self.pending_groups:
                text += f" · {self.pending_groups} group invitation(s): Ctrl+R"
        self.query_one("#status", Static).update(render.plain(f" {text} · F1 keys"))

    async def refresh_status(self) -> None:
        st = await self.client.status()
        self.locked = bool(st["locked"])
        self.has_passphrase = bool(st["has_passphrase"])
        self.relay = dict(st["relay"])
        if not self.locked:
            self.pending_requests = len(await self.client.requests())
            self.pending_groups = len(await self.client.group_invitations())
            self.typing_on = bool((await self.client.typing_config())["enabled"])
            await self.sync_calls()
        self.show_status()

    # -- events -------------------------------------------------------------------------

    async def follow_events(self) -> None:
        """Subscribe, load, then handle events; across daemon restarts, from the cursor."""
        delay = FIRST_DELAY
        loaded = False
        while True:
            stream = self.client.events(since=self.cursor, reconnect=False)
            try:
                await self.client.close()  # a stopped daemon left the request link dead
                await stream.start()
                self.subscriptions += 1
                self.daemon_up = True
                # contact.typing is live: a "stopped" (or lapse) sent while away is lost.
                self.typing.clear()
                delay = FIRST_DELAY
                await self.refresh_status()
                if self.locked:
                    await self.unlock()
                if not loaded:
                    # Subscribed first, loaded second: nothing falls between the two (an event
                    # for a message already loaded is recognised by its id).
                    await self.load()
                    loaded = True
                self.ready.set()
                async for ev in stream:
                    # The cursor moves once the event is handled: one cut short by the daemon
                    # going away is handed out again (handling is idempotent: ids seen).
                    await self.handle(ev)
                    self.cursor = stream.last_seq
            except Locked:
                self.daemon_up, self.locked = True, True
                self.show_status()
                await self.unlock()
            except (DaemonNotRunning, ConnectionLost, OSError):
                self.daemon_up = False
                self.show_status()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
            except AegisClientError as exc:  # anything else: say so, subscribe again
                self.show_status(f"daemon error ({type(exc).__name__}): retrying…")
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
            finally:
                await stream.aclose()

    async def unlock(self) -> None:
        """Ask for the passphrase until it unlocks; Esc leaves it locked until Ctrl+L."""
        if self.unlocking:
            return
        self.unlocking = True
        try:
            if not await self._unlock():
                self.wake.clear()
                await self.wake.wait()  # Ctrl+L
        finally:
            self.unlocking = False

    def action_unlock(self) -> None:
        self.wake.set()
        if self.locked and not self.unlocking:
            self.run_worker(self.unlock())

    async def _unlock(self) -> bool:
        if not self.has_passphrase:  # its key is in a file: nothing to ask
            await self.client.unlock()
            self.locked = False
            self.show_status()
            return True
        prompt = "The profile is locked. Passphrase (not shown):"
        while True:
            answer = await self.push_screen_wait(AskScreen(prompt, password=True))
            if answer is None:
                self.show_status()
                return False
            if not answer:
                prompt = "The passphrase is empty. Passphrase (not shown):"
                continue
            try:
                await self.client.unlock(answer)
            except WrongPassphrase:
                prompt = "Wrong passphrase. Passphrase (not shown):"
                continue
            except (DaemonNotRunning, ConnectionLost):
                self.daemon_up = False  # follow_events reconnects, and asks again if locked
                self.show_status()
                return False
            except AegisClientError as exc:
                prompt = f"Not unlocked ({type(exc).__name__}). Passphrase (not shown):"
                continue
            self.locked = False
            self.show_status()
            return True

    async def handle(self, ev: Event) -> None:
        d = ev.data
        t = ev.type
        if t == "message.received":
            self.typing.discard(str(d.get("contact")))  # a message ends its typing
            reply = d.get("reply_to")
            await self.incoming(ev.seq, contact_key(str(d.get("contact"))), {
                "message_id": d.get("message_id"), "direction": "in", "text": d.get("text"),
                "status": "received", "created_at": ev.time_ms, "timer": d.get("timer") or 0,
                "reply_to": None if reply is None else {
                    "message_id": reply, "text": self.quoted(str(reply))},
            })  # fmt: skip
            self.show_title()
        elif t == "group.message":
            key = group_key(int(d.get("group") or 0))
            reply = d.get("reply_to")
            # The group's timer as this client knows it (the open group's: read at open).
            timer = self.convs[key].timer if key in self.convs else 0
            await self.incoming(ev.seq, key, {
                "message_id": d.get("message_id"), "direction": "in", "text": d.get("text"),
                "from_contact": d.get("from_contact"), "from": d.get("from"),
                "created_at": ev.time_ms, "attachment_id": d.get("attachment_id"),
                "timer": timer,
                "reply_to": None if reply is None else {
                    "message_id": reply, "text": self.quoted(str(reply))},
            })  # fmt: skip
        elif t in ("message.edited", "message.reaction", "message.deleted", "message.expired"):
            await self.message_changed(t, d)
        elif t == "conversation.timer":
            await self.timer_changed(d, ev.time_ms)
        elif t == "contact.typing":
            who = str(d.get("contact"))
            if d.get("typing"):
                self.typing.add(who)
            else:
                self.typing.discard(who)
            self.show_title()
        elif t == "message.status":
            mid, status = str(d.get("message_id")), str(d.get("status"))
            row = self.rows.get(mid)
            if row is not None:
                row.set_status(status)
            else:  # perhaps ours, before send() returned; bounded: others' are never used
                self.early_status[mid] = status
                while len(self.early_status) > EARLY_MAX:
                    del self.early_status[next(iter(self.early_status))]
        elif t.startswith("attachment."):
            row = self.rows.get(str(d.get("attachment_id")))
            if row is None:
                return
            if t == "attachment.progress":
                done, total = int(d.get("done") or 0), int(d.get("total") or 0)
                pct = 100 * done // total if total else 0
                row.set_transfer(f"{pct}% ({done}/{total} blocks)")
            elif t == "attachment.completed":
                row.set_transfer("complete")
            elif t == "attachment.failed":
                row.set_transfer(f"failed: {render.name(d.get('reason') or '', 60)}")
        elif t == "call.incoming":
            self.call = {"call_id": d.get("call_id"), "contact": d.get("contact"),
                         "state": "ringing", "direction": "in"}  # fmt: skip
            self.show_status()
            self.act(self._incoming_call(dict(d)))
        elif t == "call.state":
            if d.get("state") == "ended":
                if self.call is not None and self.call.get("call_id") == d.get("call_id"):
                    self.call = None
                    reason = render.name(d.get("reason") or "", 40)
                    self.notify(f"The call ended ({reason}).", markup=False)
            else:
                self.call = {"call_id": d.get("call_id"), "contact": d.get("contact"),
                             "state": d.get("state"), "direction": d.get("direction")}  # fmt: skip
            self.show_status()
        elif t == "devices.link":
            if self.link_screen is not None:
                self.link_screen.show_state(dict(d))
        elif t == "devices.joined":
            self.notify(f"This device joined the profile ({int(d.get('devices') or 0)} devices).",
                        markup=False)  # fmt: skip
            await self.load()
        elif t in ("relay.up", "relay.down"):
            self.relay = {"connected": t == "relay.up", "reason": d.get("reason")}
            self.show_status()
        elif t == "daemon.locked":
            self.locked = True
            self.show_status()
            self.run_worker(self.unlock(), exclusive=False)
        elif t == "daemon.unlocked" or t.startswith("contact.") or t in GROUP_CHANGES:
            await self.refresh_status()
            await self.load()

    async def incoming(self, seq: int, key: str, msg: dict[str, Any]) -> None:
        conv = self.convs.get(key)
        if conv is None:
            await self.load()
            conv = self.convs.get(key)
            if conv is None:
                return
        mid = str(msg.get("message_id"))
        if key == self.open_key:
            if mid in self.rows:
                return  # loaded with the history already
            self.messages.append(msg)
            await self.add_row(msg, at_end=True)
            # Shown in the open conversation: counted unread, so that mark_read tells the
            # daemon (and the sender sees "read"), then cleared.
            theirs = msg.get("direction", "in") == "in"
            conv.note_message(str(msg.get("text") or ""), int(msg["created_at"]), theirs)
            await self.mark_read(conv)
        elif seq > self.counted_upto and mid not in conv.seen:
            # Not counted by the last load (an event at or below its cursor was: its message
            # was in conversations.list's count), nor already by an earlier event.
            conv.seen.add(mid)
            conv.note_message(str(msg.get("text") or ""), int(msg["created_at"]), True)
        self.redraw_list()

    # -- the conversation list ----------------------------------------------------------

    async def load(self) -> None:
        # The daemon's event cursor first, the counts second: every message event at or below
        # it is in the counts (one after it may be too: the seen ids catch the last one).
        upto = (await self.client.status())["last_event_seq"]
        convs = await load_conversations(self.client)
        self.counted_upto = int(upto or 0)
        self.convs = {c.key: c for c in convs}
        self.redraw_list()

    def redraw_list(self) -> None:
        lv = self.query_one("#convs", ListView)
        order = sorted(self.convs.values(), key=lambda c: c.last_at, reverse=True)
        keys = [c.key for c in order]
        if keys == [i.conv.key for i in lv.query(ConversationItem)]:
            for c in order:  # the same order: update the rows in place
                item = self.items[c.key]
                item.conv = c
                item.refresh_text()
            return
        selected = self.selected_key()
        lv.clear()
        self.items = {c.key: ConversationItem(c) for c in order}
        lv.extend(self.items.values())
        lv.index = keys.index(selected) if selected in keys else (0 if keys else None)

    def selected_key(self) -> str | None:
        lv = self.query_one("#convs", ListView)
        item = lv.highlighted_child
        return item.conv.key if isinstance(item, ConversationItem) else None

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        if isinstance(event.item, ConversationItem):
            await self.guarded(self.open(event.item.conv.key))

    # -- the open conversation ----------------------------------------------------------

    async def open(self, key: str) -> None:
        conv = self.convs[key]
        before = (self.open_key, self.messages, self.next_before)
        self.open_key = key
        self.select(None)  # also gives the compose box's Up / Down back
        self.messages, self.rows, self.next_before = [], {}, None
        try:
            if conv.group is not None:  # conversations.list does not carry a group's timer
                conv.timer = int((await self.client.get_group_timer(conv.group))["seconds"])
            await self.fetch_page()
        except BaseException:  # the daemon gone meanwhile: the conversation open before stays
            self.open_key, self.messages, self.next_before = before
            raise
        finally:
            await self.rebuild()
            self.show_title()
        if self.editing is not None:  # the edited text is not a draft for another conversation
            self.query_one("#compose", Compose).clear()
        self.set_context(None, None)
        self.query_one("#log", MessageLog).scroll_end(animate=False)
        await self.mark_read(conv)
        self.query_one("#compose", Compose).focus()

    async def fetch_page(self) -> bool:
        conv = self.convs[self.open_key] if self.open_key else None
        if conv is None:
            return False
        if conv.kind == "group":
            assert conv.group is not None
            page: Any = await self.client.group_history(
                conv.group, limit=PAGE, before=self.next_before
            )
        else:
            page = await self.client.history(conv.name, limit=PAGE, before=self.next_before)
        known = {str(m.get("message_id")) for m in self.messages}
        older = [m for m in page["messages"] if str(m.get("message_id")) not in known]
        self.messages[:0] = older
        self.next_before = page["next_before"]
        return bool(older)

    def who(self, msg: dict[str, Any]) -> str:
        if msg.get("direction") == "out":
            return "me"
        conv = self.convs.get(self.open_key or "")
        if conv is not None and conv.kind == "group":
            fc = msg.get("from_contact")
            return render.name(fc, 24) if fc else render.name(str(msg.get("from") or "?")[:8])
        return render.name(conv.name if conv else "?", 24)

    def new_row(self, msg: dict[str, Any]) -> MessageRow:
        mid = str(msg.get("message_id"))
        if mid in self.early_status:
            msg = {**msg, "status": self.early_status.pop(mid)}
        row = MessageRow(msg, self.who(msg))
        self.rows[mid] = row
        return row

    async def rebuild(self) -> None:
        log = self.query_one("#log", MessageLog)
        await log.remove_children()
        self.rows = {}
        widgets: list[Any] = []
        last_day = ""
        for m in self.messages:
            at = int(m.get("created_at") or 0)
            if render.day(at) != last_day:
                last_day = render.day(at)
                widgets.append(DaySeparator(at))
            widgets.append(self.new_row(m))
        await log.mount_all(widgets)
        if self.selected in self.rows:
            self.rows[self.selected].add_class("selected")

    async def add_row(self, msg: dict[str, Any], at_end: bool) -> None:
        log = self.query_one("#log", MessageLog)
        at = int(msg.get("created_at") or 0)
        prev = self.messages[-2] if len(self.messages) > 1 else None
        widgets: list[Any] = []
        if prev is None or render.day(int(prev.get("created_at") or 0)) != render.day(at):
            widgets.append(DaySeparator(at))
        widgets.append(self.new_row(msg))
        stick = log.is_vertical_scroll_end
        await log.mount_all(widgets)
        if stick or at_end:
            log.scroll_end(animate=False)

    async def mark_read(self, conv: Conversation) -> None:
        if conv.unread == 0:
            return
        try:
            if conv.kind == "group":
                assert conv.group is not None
                await self.client.mark_group_read(conv.group)
            else:
                await self.client.mark_read(conv.name)
        except AegisClientError:
            return
        conv.unread = 0
        if conv.key == self.open_key:  # an incoming message's timer starts when it is read
            now = int(time.time() * 1000)
            for row in self.rows.values():
                m = row.msg
                if m.get("direction") == "in" and int(m.get("timer") or 0) and not m.get(
                    "expires_at"
                ):
                    row.update_msg(expires_at=now + int(m["timer"]) * 1000)
        self.redraw_list()

    async def on_message_log_at_top(self, _: MessageLog.AtTop) -> None:
        await self.guarded(self.action_older())

    async def action_older(self) -> None:
        if self.open_key is None or self.next_before is None:
            return
        first = next(iter(self.rows.values()), None)
        if await self.fetch_page():
            await self.rebuild()
            if first is not None:
                mid = first.message_id
                log = self.query_one("#log", MessageLog)
                row = self.rows.get(mid)
                if row is not None:
                    self.call_after_refresh(log.scroll_to_widget, row, top=True, animate=False)

    async def on_compose_send(self, event: Compose.Send) -> None:
        conv = self.convs.get(self.open_key or "")
        if conv is None:
            self.notify("Open a conversation first (Tab to the list, Enter).", markup=False)
            return
        reply = self.reply_to
        try:
            if self.editing is not None:
                mid = str(self.editing.get("message_id"))
                edited_at = await self.client.edit(mid, event.text, group=conv.group)
                self.set_context(None, None)
                self.patch(mid, text=event.text, edited_at=edited_at)
                self.requote(mid, event.text)
                return
            if conv.kind == "group":
                assert conv.group is not None
                if reply is not None:
                    rid = str(reply.get("message_id"))
                    sent: Any = await self.client.group_reply(conv.group, rid, event.text)
                else:
                    sent = await self.client.send_to_group(conv.group, event.text)
                msg: dict[str, Any] = {"delivery": {"recipients": sent["recipients"]}}
                if reply is not None:
                    msg["reply_to"] = {"message_id": rid, "text": reply.get("text")}
            elif reply is not None:
                rid = str(reply.get("message_id"))
                sent = await self.client.reply(conv.name, rid, event.text)
                msg = {"status": sent["status"],
                       "reply_to": {"message_id": rid, "text": reply.get("text")}}  # fmt: skip
            else:
                sent = await self.client.send(conv.name, event.text)
                msg = {"status": sent["status"]}
            self.set_context(None, None)
            self.select(None)
            if conv.kind == "contact" and self.typing_on:
                self.typing_sent = 0.0
                self.run_worker(self._typing(conv.name, False))
            if conv.timer:
                msg.update(timer=conv.timer, expires_at=int(time.time() * 1000)
                           + conv.timer * 1000)  # fmt: skip
        except AegisClientError as exc:
            self.query_one("#compose", Compose).put_back(event.text)  # not lost
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        msg.update(
            message_id=sent["message_id"], direction="out", text=event.text,
            created_at=int(time.time() * 1000),
        )  # fmt: skip
        self.messages.append(msg)
        await self.add_row(msg, at_end=True)
        conv.note_message(event.text, int(msg["created_at"]), False)
        self.redraw_list()

    def show_title(self) -> None:
        conv = self.convs.get(self.open_key or "")
        if conv is None:
            text = "no conversation open"
        else:
            text = ("# " if conv.kind == "group" else "") + render.name(conv.name, 40)
            if conv.timer:
                text += f" · ⏱ {render.timer(conv.timer)} (F5)"
            if conv.kind == "group":
                text += " · members (Alt+G)"
            else:
                if conv.name in self.typing:
                    text += f" · {render.name(conv.name, 24)} is typing…"
        self.query_one("#title", Static).update(render.plain(f" {text}"))

    def set_context(self, reply_to: dict[str, Any] | None, editing: dict[str, Any] | None) -> None:
        """The line above the compose box: the quote of a reply, or the message being edited."""
        self.reply_to, self.editing = reply_to, editing
        bar = self.query_one("#context", Static)
        if reply_to is not None:
            shown = render.name(render.preview(reply_to.get("text") or ""), 30)
            bar.update(render.plain(f"↱ reply to ┃ {shown}"))
        elif editing is not None:
            bar.update(render.plain("✎ editing: Enter saves, Esc cancels"))
        bar.display = reply_to is not None or editing is not None

    def quoted(self, message_id: str) -> str | None:
        """A live reply's quote (the event has only its id): the text on screen; for one not
        on screen, a note (the history has the text: it shows when the conversation opens)."""
        row = self.rows.get(message_id)
        if row is None:
            return "(an earlier message)"
        return None if row.msg.get("deleted") else str(row.msg.get("text") or "")

    # -- what happens to a message after it came ------------------------------------------

    async def message_changed(self, t: str, d: dict[str, Any]) -> None:
        mid = str(d.get("message_id"))
        # A group's event names a message of that group (its ids are unique there only):
        # the rows on screen are another conversation's unless that group is open.
        in_view = d.get("group") is None or self.open_key == group_key(int(d["group"]))
        row = self.rows.get(mid) if in_view else None
        if t in ("message.expired", "message.deleted") and in_view:
            # Its text goes from every place on screen: the replies quoting it, the reply bar.
            self.requote(mid, None)
        if t == "message.expired" or (t == "message.deleted" and row is None):
            if row is not None:
                await self.drop_row(mid)
            await self.load()  # the list's preview may have been it
            return
        if row is None:
            return  # not on screen: the history has it when it is opened
        if t == "message.edited":
            text = str(d.get("text") or "")
            self.patch(mid, text=text, edited_at=d.get("edited_at"))
            self.requote(mid, text)
        elif t == "message.reaction" and d.get("group") is not None:
            # One reaction per member, and the event does not say what this member's was
            # before: the daemon's counts for this message.
            await self.refresh_group_message(mid)
        elif t == "message.reaction":
            row.update_msg(reactions=_theirs(row.msg.get("reactions"), d.get("emoji")))
        else:  # message.deleted: blank it (its quotes went above)
            self.patch(mid, deleted=True, text="", reactions=[])

    async def refresh_group_message(self, mid: str) -> None:
        """The open group's message ``mid`` as group.history has it now (its reactions): by
        its seq when known (one message), else among the newest page."""
        conv = self.convs.get(self.open_key or "")
        row = self.rows.get(mid)
        if conv is None or conv.group is None or row is None:
            return
        seq = row.msg.get("seq")
        page: Any = await self.client.group_history(
            conv.group, limit=1 if seq else PAGE, before=int(seq) + 1 if seq else None
        )
        for m in page["messages"]:
            if str(m.get("message_id")) == mid:
                self.patch(mid, reactions=list(m.get("reactions") or []), seq=m.get("seq"))

    def patch(self, mid: str, **changes: Any) -> None:
        """A message changed: its row, and its entry in the history a rebuild shows again."""
        if mid in self.rows:
            self.rows[mid].update_msg(**changes)
        for m in self.messages:
            if str(m.get("message_id")) == mid:
                m.update(changes)

    def requote(self, mid: str, text: str | None) -> None:
        """The quotes of message ``mid`` show ``text`` now (None: it is gone, deleted or
        expired): in the replies on screen, in the history kept for a rebuild, and in the
        reply bar (a gone target closes it: the reply would quote nothing)."""
        quote = {"message_id": mid, "text": text}
        for m in self.messages:
            q = m.get("reply_to")
            if isinstance(q, dict) and str(q.get("message_id")) == mid:
                m["reply_to"] = dict(quote)
        for other in self.rows.values():
            q = other.msg.get("reply_to")
            if isinstance(q, dict) and str(q.get("message_id")) == mid:
                other.update_msg(reply_to=dict(quote))
        if self.reply_to is not None and str(self.reply_to.get("message_id")) == mid:
            if text is None:
                self.set_context(None, self.editing)
            else:
                self.set_context({**self.reply_to, "text": text}, self.editing)
        if self.editing is not None and str(self.editing.get("message_id")) == mid and (
            text is None
        ):  # the message being edited went: the edit has nothing to replace
            self.query_one("#compose", Compose).clear()
            self.set_context(self.reply_to, None)

    async def drop_row(self, mid: str) -> None:
        if self.selected == mid:
            self.select(None)
        row = self.rows.pop(mid, None)
        self.messages = [m for m in self.messages if str(m.get("message_id")) != mid]
        if row is not None:
            await row.remove()

    async def timer_changed(self, d: dict[str, Any], at: int) -> None:
        group = d.get("group")
        key = group_key(int(group)) if group is not None else contact_key(str(d.get("contact")))
        conv = self.convs.get(key)
        if conv is None:
            return
        conv.timer = int(d.get("seconds") or 0)
        self.show_title()
        mid = str(d.get("message_id") or "")
        if key == self.open_key and mid and mid not in self.rows:
            msg = {
                "message_id": mid, "direction": "out" if d.get("by") == "self" else "in",
                "text": "", "timer_change": conv.timer, "created_at": at,
                "from_contact": d.get("from_contact"), "from": d.get("by"),
            }  # fmt: skip
            self.messages.append(msg)
            await self.add_row(msg, at_end=True)

    # -- the selected message ---------------------------------------------------------------

    def select(self, mid: str | None) -> None:
        if self.selected in self.rows:
            self.rows[self.selected].remove_class("selected")
        self.selected = mid if mid in self.rows else None
        self.query_one("#compose", Compose).selecting = self.selected is not None
        if self.selected is not None:
            row = self.rows[self.selected]
            row.add_class("selected")
            self.query_one("#log", MessageLog).scroll_to_widget(row, animate=False)

    def selectable(self) -> list[str]:
        return [mid for mid, r in self.rows.items() if "timer_change" not in r.msg]

    def action_select_move(self, delta: int) -> None:
        ids = self.selectable()
        if not ids:
            return
        if self.selected not in ids:
            self.select(ids[-1])
            return
        i = ids.index(self.selected) + delta
        if i >= len(ids):  # past the newest: no selection, the compose box's arrows again
            self.select(None)
            return
        self.select(ids[max(0, i)])

    def on_compose_select_move(self, event: Compose.SelectMove) -> None:
        self.action_select_move(event.delta)

    def on_message_row_clicked(self, event: MessageRow.Clicked) -> None:
        if "timer_change" not in event.row.msg:
            self.select(event.row.message_id)
            self.query_one("#compose", Compose).focus()

    def chosen(self) -> tuple[Conversation, dict[str, Any]] | None:
        """The open conversation (a contact's or a group's) and its selected message, else a
        note why not."""
        conv = self.convs.get(self.open_key or "")
        row = self.rows.get(self.selected or "")
        if conv is None or row is None:
            self.notify("Select a message first (Up from the compose box, or click).",
                        markup=False)  # fmt: skip
            return None
        if row.msg.get("deleted"):
            self.notify("That message was deleted.", markup=False)
            return None
        return conv, row.msg

    def action_reply(self) -> None:
        got = self.chosen()
        if got is None:
            return
        self.set_context(got[1], None)
        self.select(None)  # the compose box's arrows move in the reply again
        self.query_one("#compose", Compose).focus()

    def action_edit(self) -> None:
        got = self.chosen()
        if got is None:
            return
        m = got[1]
        text = str(m.get("text") or "")
        if m.get("direction") != "out" or text.startswith("[file] "):
            self.notify("Only your own texts can be edited.", markup=False)
            return
        if int(time.time() * 1000) - int(m.get("created_at") or 0) > EDIT_WINDOW_MS:
            self.notify("Too old to edit: a message can be edited for 24 hours.", markup=False)
            return
        compose = self.query_one("#compose", Compose)
        compose.clear()
        compose.insert(text)
        self.set_context(None, m)
        self.select(None)  # the arrows move in the text being edited
        compose.focus()

    def action_react(self) -> None:
        self.act(self._react())

    async def _react(self) -> None:
        got = self.chosen()
        if got is None:
            return
        m = got[1]
        answer = await self.push_screen_wait(AskScreen(react_prompt()))
        if answer is None:
            return
        emoji = picked_emoji(answer)
        mid = str(m.get("message_id"))
        try:
            await self.client.react(mid, emoji, group=got[0].group)
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        if mid in self.rows:
            row = self.rows[mid]
            row.update_msg(reactions=_mine(row.msg.get("reactions"), emoji or None))

    def action_delete_message(self) -> None:
        self.act(self._delete())

    async def _delete(self) -> None:
        got = self.chosen()
        if got is None:
            return
        m = got[1]
        mine = m.get("direction") == "out" and not str(m.get("text") or "").startswith("[file] ")
        where = "every member's" if got[0].kind == "group" else "the contact's"
        prompt = "Delete this message? Type me (from this device only)" + (
            f", or everyone (also at {where}, if their client obeys)" if mine else ""
        ) + ". Esc: keep it."
        answer = (await self.push_screen_wait(AskScreen(prompt)) or "").strip().lower()
        if answer not in (("me", "everyone") if mine else ("me",)):
            return
        mid = str(m.get("message_id"))
        try:
            await self.client.delete(mid, for_everyone=answer == "everyone", group=got[0].group)
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        if answer == "everyone":
            await self.message_changed("message.deleted", {"message_id": mid})
        else:
            self.requote(mid, None)
            await self.drop_row(mid)
            with contextlib.suppress(AegisClientError):  # the list catches up on the next event
                await self.load()

    # -- search, the timer, typing ---------------------------------------------------------

    def action_search(self) -> None:
        self.act(self._search())

    async def find(self, query: str) -> list[tuple[dict[str, Any], str]]:
        try:
            found = await self.client.search(query, limit=SEARCH_LIMIT)
        except InvalidParams as exc:
            raise ValueError(str(exc) or "nothing to search for") from None
        except AegisClientError as exc:  # the daemon stopped or locked: said in the box
            raise ValueError(f"not searched: {_error_text(exc)}") from None
        out = []
        for hit in found["results"]:
            h: dict[str, Any] = dict(hit)
            m = h["message"]
            where = (f"# {render.name(h.get('group_name') or '?', 24)}" if h["kind"] == "group"
                     else render.name(h.get("contact") or "?", 24))  # fmt: skip
            at = render.when(int(m.get("created_at") or 0))
            out.append((h, f"{where}  {at}\n  {render.preview(m.get('text') or '')}"))
        return out

    async def _search(self) -> None:
        hit = await self.push_screen_wait(SearchScreen(self.find))
        if hit is None:
            return
        key = (group_key(int(hit["group"])) if hit["kind"] == "group"
               else contact_key(str(hit["contact"])))  # fmt: skip
        mid = str(hit["message"].get("message_id"))
        try:
            if key not in self.convs:
                await self.load()
                if key not in self.convs:
                    return
            await self.open(key)
            fetched = False
            # Older pages until the hit's; the rows are built once, after them (not page
            # after page: quadratic in the pages).
            while self.next_before is not None and mid not in {
                str(m.get("message_id")) for m in self.messages
            }:
                if not await self.fetch_page():
                    break
                fetched = True
            if fetched:
                await self.rebuild()
        except AegisClientError as exc:  # the daemon stopped or locked meanwhile
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        if mid in self.rows:
            self.call_after_refresh(self.select, mid)

    def action_timer(self) -> None:
        self.act(self._timer())

    async def _timer(self) -> None:
        conv = self.convs.get(self.open_key or "")
        if conv is None:
            self.notify("Open a conversation first.", markup=False)
            return
        choices = "  ".join(f"{i} {render.timer(v)}" for i, v in enumerate(render.TIMERS))
        answer = await self.push_screen_wait(AskScreen(
            f"Disappearing messages {'in' if conv.kind == 'group' else 'with'}"
            f" “{render.name(conv.name, 40)}” (now"
            f" {render.timer(conv.timer)}):\n{choices}\n\nA number (Esc: leave it)."
        ))  # fmt: skip
        i = menus.number(answer or "")
        if i is None or i >= len(render.TIMERS):
            return
        try:
            if conv.group is not None:  # any member may; every member shows the change
                got = await self.client.set_group_timer(conv.group, render.TIMERS[i])
            else:
                got = await self.client.set_timer(conv.name, render.TIMERS[i])
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        conv.timer = int(got["seconds"])
        self.show_title()  # the timer line comes with the conversation.timer event

    def on_text_area_changed(self, event: Compose.Changed) -> None:
        text = event.text_area.text
        area = event.text_area
        if isinstance(area, Compose) and area.quiet_text is not None:
            # Still the text put back by the client (each of its Changed reads the text as
            # it is now): no notice; once the user changes it, notices again.
            if text == area.quiet_text:
                return
            area.quiet_text = None
        conv = self.convs.get(self.open_key or "")
        if not self.typing_on or conv is None or conv.kind != "contact" or self.editing:
            return
        if not text:
            return
        now = time.monotonic()
        if now - self.typing_sent >= TYPING_EVERY:  # the daemon rate-limits; fewer calls
            self.typing_sent = now
            self.run_worker(self._typing(conv.name, True))

    async def _typing(self, contact: str, typing: bool) -> None:
        # One at a time, in the order asked (asyncio's lock is FIFO): a "stopped" never goes
        # ahead of a "typing" still in flight, which would leave the contact seeing "typing".
        async with self.typing_lock:
            with contextlib.suppress(AegisClientError):
                await self.client.typing(contact, typing)

    # -- actions --------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # A dialog's keys are its own: Alt+D typed while a dialog asks something does not
        # open "remove the contact" over it (nor a group, a call or the settings).
        return not (action in MAIN_SCREEN_ONLY and isinstance(self.screen, ModalScreen))

    def act(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a user's action as a worker, guarded (``guarded``)."""
        self.run_worker(self.guarded(work), group=ACTION_WORKERS)

    async def guarded(self, work: Coroutine[Any, Any, None]) -> None:
        """Await an action: the daemon stopping or locking in the middle of it is a note, never
        an error that ends the client (follow_events says so in the status line and
        reconnects; the action can be done again then)."""
        try:
            await work
        except (DaemonNotRunning, ConnectionLost, OSError):
            self.notify(NOT_REACHABLE, severity="error", markup=False)
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
        except Exception as exc:  # a bug in an action: reported, the client stays up
            # Its type only: an error's text may hold what the user typed.
            self.notify(f"not done: an unexpected {type(exc).__name__}", severity="error",
                        markup=False)  # fmt: skip

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_go_back(self) -> None:
        if self.selected is not None:  # first Esc: drop the selection
            self.select(None)
            return
        if self.reply_to is not None or self.editing is not None:
            if self.editing is not None:
                self.query_one("#compose", Compose).clear()
            self.set_context(None, None)
            return
        self.query_one("#convs", ListView).focus()

    def action_quit_unless_typing(self) -> None:
        # A bare q quits only from the list with no conversation open: with one open the user
        # may be typing anywhere (Ctrl+Q quits always).
        # Nor over a dialog (the device link's: a q typed there leaves the link waiting).
        if self.open_key is None and not isinstance(self.focused, Compose) and not isinstance(
            self.screen, ModalScreen
        ):
            self.exit()

    def action_jump(self) -> None:
        self.act(self._jump())

    async def _jump(self) -> None:
        answer = await self.push_screen_wait(AskScreen("Jump to (a name or part of one):"))
        if not answer:
            return
        want = answer.casefold()
        convs = sorted(self.convs.values(), key=lambda c: c.last_at, reverse=True)
        match = next((c for c in convs if c.name.casefold().startswith(want)), None) or next(
            (c for c in convs if want in c.name.casefold()), None
        )
        if match is None:
            self.notify("No conversation by that name.", markup=False)
            return
        lv = self.query_one("#convs", ListView)
        keys = [i.conv.key for i in lv.query(ConversationItem)]
        if match.key in keys:
            lv.index = keys.index(match.key)
        await self.open(match.key)

    def action_requests(self) -> None:
        self.act(self._requests())

    async def _requests(self) -> None:
        """Contact requests first, then group invitations, one dialog each."""
        try:
            reqs = await self.client.requests()
            invs = await self.client.group_invitations()
            if not reqs and not invs:
                self.notify("No contact request or group invitation waits.", markup=False)
                return
            for r in reqs:
                who = render.name(r["name"], 40)
                prompt = (
                    f"Contact request from “{who}”\nsafety number {render.name(r['safety_number'])}"
                    "\n\nType a name to accept as that contact, or - to reject (Esc: later)."
                )
                answer = await self.push_screen_wait(AskScreen(prompt, value=r["name"][:64]))
                if answer is None:
                    continue
                if answer.strip() == "-":
                    await self.client.call("requests.reject", {"request": r["request"]})
                else:
                    await self.client.accept(r["request"], answer.strip() or None)
            for inv in invs:
                i: dict[str, Any] = dict(inv)
                prompt = (
                    f"Invitation to the group “{render.name(i.get('name') or '?', 40)}” from"
                    f" “{render.name(i.get('from') or '?', 40)}” ({int(i.get('members') or 0)}"
                    " members)\n\nType yes to join, or - to decline (Esc: later)."
                )
                answer = (await self.push_screen_wait(AskScreen(prompt)) or "").strip().lower()
                if answer == "yes":
                    await self.client.accept_group(int(i["invitation"]))
                elif answer == "-":
                    await self.client.decline_group(int(i["invitation"]))
            await self.refresh_status()
            await self.load()
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)

    def action_invite(self) -> None:
        self.act(self._invite())

    async def _invite(self) -> None:
        try:
            inv = await self.client.create_invitation()
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        link = render.name(inv["link"], 4000)
        try:
            qr = qr_text(link)
        except QRUnavailable as exc:
            qr = f"({exc})\n"
        text = (
            "A one-time invitation: give this link to one person, or let them scan the code"
            f" (arrows scroll).\n\n{link}\n\n{qr}"
        )
        await self.push_screen_wait(InfoScreen(text))

    def target(self) -> Conversation | None:
        """The contact an action is about: the open conversation, else the highlighted one."""
        conv = self.convs.get(self.open_key or "") or self.convs.get(self.selected_key() or "")
        if conv is None or conv.kind != "contact":
            self.notify("Open or highlight a contact first.", markup=False)
            return None
        return conv

    def action_rename(self) -> None:
        self.act(self._contact_action("rename"))

    def action_block(self) -> None:
        self.act(self._contact_action("block"))

    def action_safety(self) -> None:
        self.act(self._contact_action("safety"))

    async def _contact_action(self, what: str) -> None:
        conv = self.target()
        if conv is None:
            return
        shown = render.name(conv.name, 64)
        try:
            if what == "rename":
                new = await self.push_screen_wait(AskScreen(f"Rename “{shown}” to:"))
                if not new or not new.strip():
                    return
                await self.client.call(
                    "contacts.rename", {"name": conv.name, "new_name": new.strip()}
                )
                if self.open_key == conv.key:
                    self.open_key = contact_key(new.strip())
            elif what == "block":
                verb = "Unblock" if conv.blocked else "Block"
                answer = await self.push_screen_wait(
                    AskScreen(f"{verb} “{shown}”? Type yes to confirm.")
                )
                if (answer or "").strip().lower() != "yes":
                    return
                await self.client.call(
                    "contacts.block", {"name": conv.name, "blocked": not conv.blocked}
                )
            else:
                sn = await self.client.call("contacts.safety_number", {"name": conv.name})
                state = "verified" if conv.verified else "not verified"
                prompt = (
                    f"Safety number with “{shown}” ({state}):\n\n"
                    f"{render.name(sn['formatted'].replace(chr(10), '  '), 100)}\n\n"
                    "Compare it with theirs (in person or on a call). The same? Type yes to"
                    " mark them verified (no: clear the mark; Esc: leave it)."
                )
                answer = (await self.push_screen_wait(AskScreen(prompt)) or "").strip().lower()
                if answer not in ("yes", "no"):
                    return
                await self.client.call(
                    "contacts.verify", {"name": conv.name, "verified": answer == "yes"}
                )
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        await self.load()
        self.show_title()

    def action_send_file(self) -> None:
        self.act(self._send_file())

    async def _send_file(self) -> None:
        opened = self.convs.get(self.open_key or "")
        # The open group, else the contact (open or highlighted).
        conv = opened if opened is not None and opened.kind == "group" else self.target()
        if conv is None:
            return
        if self.open_key != conv.key:
            await self.open(conv.key)
        path = await self.push_screen_wait(AskScreen(
            "Send files: a path (several: each in quotes, separated by spaces)"))  # fmt: skip
        if not path or not path.strip():
            return
        paths = _paths(path)
        if not paths:
            self.notify("No path given (check the quotes).", markup=False)
            return
        caption = await self.push_screen_wait(AskScreen("A caption (optional: Enter for none)"))
        if caption is None:
            return
        try:
            if conv.group is not None:  # one group message per file; the caption on the first
                files: list[Any] = [
                    await self.client.send_file_to_group(conv.group, p,
                                                         caption if i == 0 and caption else None)
                    for i, p in enumerate(paths)
                ]  # fmt: skip
            elif len(paths) == 1:
                files = [await self.client.send_file(conv.name, paths[0], caption or None)]
            else:
                files = list((await self.client.send_files(conv.name, paths,
                                                            caption or None))["attachments"])
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        for i, sent in enumerate(files):
            text = f"[file] {sent.get('name') or '?'}"
            if i == 0 and caption:
                text += f"\n{caption}"
            msg: dict[str, Any] = {
                "message_id": sent["message_id"], "direction": "out", "text": text,
                "status": "queued", "created_at": int(time.time() * 1000),
            }  # fmt: skip
            if conv.group is not None:
                msg["delivery"] = {"recipients": sent["recipients"]}
            if sent["message_id"] not in self.rows:
                self.messages.append(msg)
                await self.add_row(msg, at_end=True)
            row = self.rows[sent["message_id"]]
            # A group's file uploads as one copy per member (attachments of their own): its
            # receipts count on the message instead.
            if not row.transfer and conv.group is None:  # its progress may have come first
                row.set_transfer("uploading")
            conv.note_message(text, int(msg["created_at"]), False)
        self.redraw_list()

    def action_save_file(self) -> None:
        self.act(self._save_file())

    async def _save_file(self) -> None:
        """Save a file received in the open conversation: any of them, chosen by number (the
        newest by default), to a path asked for."""
        conv = self.convs.get(self.open_key or "")
        if conv is None:
            self.notify("Open a conversation first.", markup=False)
            return
        if conv.kind == "contact":  # every file of the contact, not only the loaded page's
            got = await self.client.call("attachments.list", {"contact": conv.name})
            files = [dict(a) for a in got["attachments"] if a.get("direction") == "in"]
        else:  # a group's: those of its loaded history (attachments.list knows no group), as
            # attachments.list has them (their state); a text that looks like a file is not one
            ids = [str(m["attachment_id"]) for m in self.messages
                   if m.get("direction") == "in" and m.get("attachment_id")]  # fmt: skip
            got = await self.client.call("attachments.list", {}) if ids else {"attachments": []}
            by_id = {str(a.get("attachment_id")): dict(a) for a in got["attachments"]}
            files = [by_id[i] for i in ids if i in by_id]
        if not files:
            self.notify("No received file in this conversation.", markup=False)
            return
        answer = await self.push_screen_wait(AskScreen(menus.files_prompt(files)))
        if answer is None:
            return
        f = menus.pick(files, answer)
        if f is None:
            self.notify("No file with that number.", markup=False)
            return
        if f.get("state") not in ("complete", "received"):
            self.notify(f"Not received yet: {menus.file_state(f)}.", markup=False)
            return
        shown = render.name(f.get("name") or "?", 60)
        where = await self.push_screen_wait(
            AskScreen(f"Save “{shown}” to (a directory or a file name):", value=os.getcwd())
        )
        if not where or not where.strip():
            return
        full = os.path.abspath(os.path.expanduser(where.strip()))
        self.notify(f"Saving “{shown}”…", markup=False)
        try:
            r = await self.client.call(
                "attachments.save", {"attachment_id": str(f["attachment_id"]), "path": full}
            )
        except (DaemonNotRunning, ConnectionLost):
            raise
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        self.notify(f"Saved as {render.name(r['path'], 200)} ({menus.size(int(r['size']))})",
                    markup=False)  # fmt: skip

    # -- groups, calls, removing a contact, settings ------------------------------------------

    def action_groups(self) -> None:
        self.act(self._groups())

    async def _groups(self) -> None:
        """The open group, else the highlighted one: its members and roles, and commands on it;
        with no group there, a new group. One line per command, the group shown again after."""
        ref = None
        for key in (self.open_key, self.selected_key()):
            conv = self.convs.get(key or "")
            if conv is not None and conv.kind == "group":
                ref = conv.group
                break
        if ref is None:
            ref = await self._new_group()
            if ref is None:
                return
        note = ""
        while True:
            g: dict[str, Any] = dict(await self.client.group(ref))
            keys = {str(m.get("contact")) for m in g.get("members") or [] if m.get("contact")}
            invitable = [
                c["name"] for c in await self.client.contacts()
                if c.get("established") and not c.get("blocked") and c["name"] not in keys
            ] if g.get("role") in ("admin", "owner") else []  # fmt: skip
            answer = await self.push_screen_wait(
                AskScreen(menus.group_prompt(g, invitable, note))
            )
            if answer is None or not answer.strip():
                return
            cmd = menus.parse(answer)
            if cmd is None:
                note = "Not a command: invite, remove, admin, member, owner, rename, leave, new."
                continue
            try:
                note, made = await self._group_command(ref, g, cmd)
            except (DaemonNotRunning, ConnectionLost):
                raise
            except AegisClientError as exc:
                note = f"Not done: {_error_text(exc)}"
                continue
            if cmd.verb == "leave" and note.startswith("Left"):
                self.notify(note, markup=False)
                return
            if made is not None:  # "new NAME": the new group is shown from now on
                ref = made

    async def _new_group(self) -> int | None:
        name = await self.push_screen_wait(AskScreen("A new group: its name (Esc: none)"))
        if not name or not name.strip():
            return None
        g = await self.client.create_group(name.strip())
        await self.load()
        await self.open(group_key(int(g["group"])))
        return int(g["group"])

    async def _group_command(
        self, ref: int, g: dict[str, Any], cmd: menus.Command
    ) -> tuple[str, int | None]:
        """Do one command; returns the note shown under the group and, after "new", the new
        group's ref (the group shown next)."""
        if cmd.verb == "new":
            if not cmd.arg:
                return "new NAME: the name of the new group.", None
            made = await self.client.create_group(cmd.arg)
            await self.load()
            await self.open(group_key(int(made["group"])))
            return "Created: invite your contacts to it.", int(made["group"])
        if cmd.verb == "leave":
            gone = render.name(g.get("name") or "?", 40)
            if not await self._confirm(f"Leave “{gone}”? Type yes to confirm."):
                return "", None
            await self.client.leave_group(ref)
            if self.open_key == group_key(ref):
                await self.close_conversation()
            await self.load()
            return f"Left the group “{gone}”.", None
        if cmd.verb == "rename":
            if not cmd.arg:
                return "rename NAME: the group's new name.", None
            await self.client.rename_group(ref, cmd.arg)
            await self.load()
            self.show_title()
            return "Renamed.", None
        if cmd.verb == "invite":
            if not cmd.arg:
                return "invite NAME: one of your contacts.", None
            await self.client.invite_to_group(ref, cmd.arg)
            return f"Invited “{render.name(cmd.arg, 40)}”: a member once they accept.", None
        found = menus.member_ref(g, cmd.arg)
        if found is None:
            return (f"{cmd.verb} N: a member's number in the list (1 to {menus.LISTED}), or a"
                    " contact's name.", None)  # fmt: skip
        member, label = found
        # A typo in N acts on another member: the question names the one it would be.
        what = ("Remove" if cmd.verb == "remove" else f"Make {cmd.verb}:") + f" “{label}”"
        if not await self._confirm(f"{what}? Type yes to confirm."):
            return "Not done.", None
        if cmd.verb == "remove":
            await self.client.remove_from_group(ref, member)
            return f"Removed “{label}”.", None
        role: Literal["member", "admin", "owner"] = (
            "admin" if cmd.verb == "admin" else "owner" if cmd.verb == "owner" else "member"
        )
        await self.client.set_group_role(ref, member, role)
        return f"“{label}” is now {role}.", None

    async def _confirm(self, prompt: str) -> bool:
        return (await self.push_screen_wait(AskScreen(prompt)) or "").strip().lower() == "yes"

    async def close_conversation(self) -> None:
        """No conversation open (it was removed, or left)."""
        self.open_key = None
        self.select(None)
        self.messages, self.next_before = [], None
        self.set_context(None, None)
        await self.rebuild()
        self.show_title()

    def action_start_call(self) -> None:
        self.act(self._start_call())

    async def _start_call(self) -> None:
        conv = self.target()
        if conv is None:
            return
        if self.call is not None:
            self.notify("A call is under way: F8 hangs up.", markup=False)
            return
        shown = render.name(conv.name, 40)
        # A word, not a key: Ctrl+P pressed by mistake in the middle of a sentence must not
        # call with the rest of it (a call shows the user's IP and opens the microphone).
        answer = await self.push_screen_wait(AskScreen(
            f"Call “{shown}”? Type voice (a voice call) or video (a video call); anything else:"
            " no call.\n(The daemon's microphone and speaker: those of the machine it runs"
            " on.)"))  # fmt: skip
        kind = (answer or "").strip().lower()
        if kind not in ("voice", "video"):
            self.notify("No call.", markup=False)
            return
        video = kind == "video"
        try:
            c = await self.client.start_call(conv.name, video=video)
        except RevealsIp:
            if not await self._ip_consent("This call"):
                return
            c = await self.client.start_call(conv.name, video=video, reveal_ip=True)
        # The call's events may have come first (then self.call has it), or an incoming call
        # rung meanwhile: neither is replaced; a call already over is not kept.
        if self.call is None and c["state"] != "ended":
            self.call = {"call_id": c["call_id"], "contact": c["contact"], "state": c["state"],
                         "direction": "out"}  # fmt: skip
        self.show_status()

    async def _ip_consent(self, what: str) -> bool:
        return await self._confirm(
            f"{what} would show your IP address to the contact (relays are reached through Tor"
            " or a proxy, and no TURN server hides it). Type yes to go on anyway."
        )

    async def sync_calls(self) -> None:
        """The call under way as the daemon has it (calls.list): after a reconnect (a daemon
        stopped mid-call sent no "ended"), or when an action found the call gone."""
        live = [dict(c) for c in await self.client.calls() if c.get("state") != "ended"]
        mine = self.call.get("call_id") if self.call is not None else None
        c = next((c for c in live if c.get("call_id") == mine), live[0] if live else None)
        self.call = None if c is None else {
            "call_id": c.get("call_id"), "contact": c.get("contact"), "state": c.get("state"),
            "direction": c.get("direction")}  # fmt: skip

    def action_remove_contact(self) -> None:
        self.act(self._remove_contact())

    async def _remove_contact(self) -> None:
        conv = self.target()
        if conv is None:
            return
        shown = render.name(conv.name, 40)
        answer = await self.push_screen_wait(AskScreen(
            f"Remove “{shown}”? Their messages and files go from this device, and your mailbox"
            " for them at the relay: what they send afterwards goes nowhere. Type yes to"
            " remove (Esc: keep)."))  # fmt: skip
        if (answer or "").strip().lower() != "yes":
            return
        await self.client.call("contacts.remove", {"name": conv.name})
        if self.open_key == conv.key:
            await self.close_conversation()
        await self.load()
        self.notify(f"Removed “{shown}”.", markup=False)

    def action_settings(self) -> None:
        self.act(self._settings())

    async def _settings(self) -> None:
        note = ""
        while True:
            typing_on = bool((await self.client.typing_config())["enabled"])
            default = int((await self.client.settings()).get("disappearing_default") or 0)
            answer = await self.push_screen_wait(
                AskScreen(menus.settings_prompt(typing_on, default, note))
            )
            a = (answer or "").strip()
            if a == "1":
                got = await self.client.typing_config(not typing_on)
                self.typing_on = bool(got["enabled"])  # in force here at once
                note = f"Typing indicators {'on' if self.typing_on else 'off'}."
            elif a == "2":
                pick = await self.push_screen_wait(AskScreen(
                    f"The disappearing timer of new conversations (now {render.timer(default)})"
                    f":\n{menus.timer_choices()}\n\nA number (Esc: leave it)."))  # fmt: skip
                i = menus.number(pick or "")
                if i is None or i >= len(render.TIMERS):
                    note = ""
                    continue
                await self.client.call("settings.set", {"disappearing_default": render.TIMERS[i]})
                note = f"New conversations start with {render.timer(render.TIMERS[i])}."
            elif answer is None or not a:
                return
            else:
                note = "1 or 2."

    def action_devices(self) -> None:
        self.act(self._devices())

    async def _devices(self) -> None:
        """The profile's devices (this one marked), and commands: link a new one, remove one
        (a question naming it first)."""
        note = ""
        while True:
            listed: dict[str, Any] = dict(await self.client.call("devices.list", {}))
            answer = await self.push_screen_wait(
                AskScreen(menus.devices_prompt(listed, note))
            )
            if answer is None or not answer.strip():
                return
            cmd = menus.parse(answer, menus.DEVICE_VERBS)
            if cmd is None:
                note = "Not a command: link, or remove N."
                continue
            try:
                note = await (self._link() if cmd.verb == "link" else self._remove_device(
                    listed, cmd.arg))  # fmt: skip
            except (DaemonNotRunning, ConnectionLost):
                raise
            except AegisClientError as exc:
                note = f"Not done: {_error_text(exc)}"

    async def _remove_device(self, listed: dict[str, Any], arg: str) -> str:
        d = menus.device_ref(listed, arg)
        if d is None:
            return f"remove N: a device's number in the list (1 to {menus.LISTED})."
        if d.get("this_device"):
            return "This device is the one in use: remove it from another one."
        label = menus.device_label(d)
        if not await self._confirm(
            f"Remove the device “{label}” from the list? Its mailboxes stay at the relay and"
            " contacts are not told yet (today only this device's list changes). Type yes to"
            " confirm."
        ):
            return "Not removed."
        await self.client.call("devices.remove", {"id": str(d["id"])})
        return f"Removed “{label}” from the list."

    async def _link(self) -> str:
        """A link for a new device, shown with its QR code until the link is over; the code
        the new device shows, typed here (LinkScreen)."""
        self.notify("Making the link at the relay (a few seconds)…", markup=False)
        r = await self.client.call("devices.link", {})
        link = render.name(r["link"], 4000)
        try:
            qr = qr_text(link)
        except QRUnavailable as exc:
            qr = f"({exc})\n"
        until = render.deadline(int(r["expires"]) * 1000)
        text = f"The link (a secret: it works once, until {until}):\n\n{link}\n\n{qr}"
        screen = LinkScreen(text, self._link_answer, self._link_cancel)
        self.link_screen = screen
        try:
            self.run_worker(self._link_sync(screen))  # a state reached before it showed
            await self.push_screen_wait(screen)
        finally:
            self.link_screen = None
        ends = {"done": "A new device was linked.", "declined": "The link was declined.",
                "expired": "The link expired."}  # fmt: skip
        return ends.get(str(screen.state.get("state")), "The link ended.")

    async def _link_sync(self, screen: LinkScreen) -> None:
        with contextlib.suppress(AegisClientError):
            st = (await self.client.call("devices.status", {}))["link"]
            if st is not None:
                screen.show_state(dict(st))

    async def _link_answer(self, code: str | None) -> None:
        """The code typed (the daemon compares it with the new device's), or None: decline."""
        params: dict[str, Any] = {"code": code} if code is not None else {"accept": False}
        try:
            st = await self.client.call("devices.confirm", params)
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            if self.link_screen is not None:  # where the link is now (over, perhaps)
                await self._link_sync(self.link_screen)
            return
        if self.link_screen is not None:
            self.link_screen.show_state(dict(st))

    async def _link_cancel(self) -> None:
        # Over already (a race with its last event): nothing to cancel.
        with contextlib.suppress(AegisClientError):
            await self.client.call("devices.cancel", {})

    async def _incoming_call(self, d: dict[str, Any]) -> None:
        who = render.name(d.get("contact") or "?", 40)
        choice = await self.push_screen_wait(CallScreen(who, bool(d.get("video"))))
        call_id = d.get("call_id")
        if self.call is None or self.call.get("call_id") != call_id:
            return  # it ended meanwhile
        try:
            if choice == "answer":
                try:
                    await self.client.answer_call(str(call_id))
                except RevealsIp:  # the consent calls.start asks for, for answering too
                    if await self._ip_consent("Answering"):
                        await self.client.answer_call(str(call_id), reveal_ip=True)
            elif choice == "decline":
                await self.client.reject_call(str(call_id))
        except (DaemonNotRunning, ConnectionLost):
            raise
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            await self.sync_calls()

    async def action_hang_up(self) -> None:
        await self.guarded(self._hang_up())

    async def _hang_up(self) -> None:
        if self.call is None:
            self.notify("No call.", markup=False)
            return
        call_id = str(self.call.get("call_id"))
        try:
            if self.call.get("state") == "ringing" and self.call.get("direction") == "in":
                await self.client.reject_call(call_id)
            else:
                await self.client.hangup(call_id)
        except (DaemonNotRunning, ConnectionLost):
            raise
        except AegisClientError as exc:  # not_found: over already; call_state: it moved on
            self.notify(_error_text(exc), severity="error", markup=False)
            await self.sync_calls()
            self.show_status()

    def action_add_contact(self) -> None:
        self.act(self._add_contact())

    async def _add_contact(self) -> None:
        link = await self.push_screen_wait(AskScreen("Add a contact: paste their link"))
        if not link:
            return
        name = await self.push_screen_wait(AskScreen("The name you give this contact:"))
        if not name:
            return
        try:
            await self.client.add_contact(name.strip(), link.strip())
        except AegisClientError as exc:
            self.notify(_error_text(exc), severity="error", markup=False)
            return
        await self.load()


def _paths(answer: str) -> list[str]:
    """One path (spaces and all), or several separated by spaces, those with spaces quoted (as
    in a shell): absolute, as the daemon wants them. Unbalanced quotes: none."""
    one = answer.strip()
    if '"' in one or "'" in one:
        try:
            parts = shlex.split(one)
        except ValueError:
            return []
    else:
        parts = [one]
    return [os.path.abspath(os.path.expanduser(p)) for p in parts if p.strip()]


def _theirs(reactions: Any, emoji: Any) -> list[dict[str, Any]]:
    """The reactions after the contact set (or removed: None) its one reaction."""
    out = []
    for r in reactions if isinstance(reactions, list) else []:
        others = int(r.get("count") or 0) - (1 if r.get("mine") else 0)
        if others > 0:  # this count holds the contact's reaction (one-to-one: one other)
            r = {**r, "count": int(r["count"]) - 1}
        if int(r.get("count") or 0) > 0:
            out.append(dict(r))
    if emoji:
        return _add(out, str(emoji), mine=False)
    return out


def _mine(reactions: Any, emoji: str | None) -> list[dict[str, Any]]:
    """The reactions after one's own one was set (or removed: None)."""
    out = []
    for r in reactions if isinstance(reactions, list) else []:
        if r.get("mine"):
            r = {**r, "count": int(r.get("count") or 0) - 1, "mine": False}
        if int(r.get("count") or 0) > 0:
            out.append(dict(r))
    return _add(out, emoji, mine=True) if emoji else out


def _add(reactions: list[dict[str, Any]], emoji: str, *, mine: bool) -> list[dict[str, Any]]:
    for r in reactions:
        if r.get("emoji") == emoji:
            r["count"] = int(r.get("count") or 0) + 1
            r["mine"] = bool(r.get("mine")) or mine
            break
    else:
        reactions.append({"emoji": emoji, "count": 1, "mine": mine})
    return sorted(reactions, key=lambda r: str(r.get("emoji")))


def run(socket: Path) -> str | None:
    """Run the client until the user quits; the terminal is restored on every way out (Textual
    does it, on an error too). Returns why it stopped after an unexpected error, else None."""
    app = ChatApp(socket)
    with contextlib.suppress(KeyboardInterrupt):
        app.run()
    return app.failure
