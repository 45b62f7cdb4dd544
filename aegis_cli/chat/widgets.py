"""The client's widgets: the conversation list's rows, the message log and the compose box.
Every peer-supplied string arrives here already made safe (``render``) and is shown through
``render.plain``: never as markup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import ListItem, Static, TextArea

from . import render
from .model import Conversation


class ConversationItem(ListItem):
    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.line = Static(markup=False)
        super().__init__(self.line)
        self.refresh_text()

    def refresh_text(self) -> None:
        c = self.conv
        unread = f" ({c.unread})" if c.unread else ""
        tag = "# " if c.kind == "group" else ""
        flags = " [blocked]" if c.blocked else "" if c.established else " [waiting]"
        mark = " ✔" if c.verified else ""
        head = f"{tag}{render.name(c.name, 24)}{mark}{unread}{flags}  {render.when(c.last_at)}"
        self.line.update(render.plain(f"{head}\n  {render.preview(c.last_text)}"))


class MessageRow(Vertical):
    """One message: a header (time, who, an outgoing one's status mark, "edited", when it
    disappears; updated live), the quote of a reply, the text indented by the CSS (wrapped
    lines too, so that no line of a text can pass for the header of another message), and the
    reactions with their counts. A click selects it (for reply, react, edit, delete)."""

    @dataclass
    class Clicked(Message):
        row: MessageRow

    def __init__(self, msg: dict[str, Any], who: str) -> None:
        super().__init__(classes="out" if msg.get("direction") == "out" else "in")
        self.msg = dict(msg)
        self.who = who
        self.transfer = ""  # a file's transfer: "3/10 blocks", "complete", "failed: ..."
        self.head = Static(markup=False, classes="head")
        self.quote = Static(markup=False, classes="quote")
        self.text = Static(markup=False, classes="text")
        self.reacts = Static(markup=False, classes="reacts")
        self.show()

    def compose(self) -> ComposeResult:
        yield self.head
        yield self.quote
        yield self.text
        yield self.reacts

    @property
    def message_id(self) -> str:
        return str(self.msg.get("message_id") or "")

    @property
    def plain(self) -> str:
        """What is shown, as text (for tests): the header, then each non-empty part."""
        parts = [_plain(self.head)]
        parts += [_plain(w) for w in (self.quote, self.text, self.reacts) if w.display]
        return "\n".join(parts)

    def on_click(self, event: events.Click) -> None:
        event.stop()
        self.post_message(self.Clicked(self))

    def set_transfer(self, text: str) -> None:
        self.transfer = text
        self.show()

    def set_status(self, status: str) -> None:
        self.msg["status"] = status
        self.show()

    def update_msg(self, **changes: Any) -> None:
        self.msg.update(changes)
        self.show()

    def show(self) -> None:
        m = self.msg
        at = render.clock(int(m.get("created_at") or 0))
        if "timer_change" in m:  # a line recording a change of the disappearing timer
            by = "you" if m.get("direction") == "out" else self.who
            label = render.timer(int(m.get("timer_change") or 0))
            self.head.update(render.plain(f"{at} ⏱ {by} set disappearing messages: {label}"))
            for w in (self.quote, self.text, self.reacts):
                w.display = False
            return
        status = ""
        if m.get("direction") == "out":
            delivery = m.get("delivery")
            if isinstance(delivery, dict):  # a group message: receipts counted per member
                status = f"  ✓{delivery.get('delivered', 0)}/{delivery.get('recipients', 0)}"
            else:
                status = f"  {render.mark(str(m.get('status') or ''))}"
        transfer = f"  [{self.transfer}]" if self.transfer else ""
        notes = ""
        if m.get("edited_at") and not m.get("deleted"):
            notes += "  edited"
        if m.get("expires_at"):
            notes += f"  ⏱ goes at {render.deadline(int(m['expires_at']))}"
        elif int(m.get("timer") or 0) > 0:
            notes += f"  ⏱ {render.timer(int(m['timer']))} after it is read"
        self.head.update(render.plain(f"{at} {self.who}{status}{transfer}{notes}"))
        quote = m.get("reply_to")
        self.quote.display = isinstance(quote, dict)
        if isinstance(quote, dict):
            qt = quote.get("text")
            shown = render.preview(qt) if qt else "(the quoted message is not here)"
            self.quote.update(render.plain(f"┃ {shown}"))
        if m.get("deleted"):
            self.text.update(render.plain("(deleted)"))
        else:
            self.text.update(render.plain(render.body(m.get("text") or "")))
        line = "" if m.get("deleted") else render.reactions(m.get("reactions"))
        self.reacts.display = bool(line)
        self.reacts.update(render.plain(line))


def _plain(widget: Static) -> str:
    content = widget.content
    # Always a Content built from plain text (render.plain): never a markup string.
    return content.plain if isinstance(content, Content) else f"<not Content: {content!r}>"


class DaySeparator(Static):
    def __init__(self, ms: int) -> None:
        super().__init__(render.plain(f"── {render.day(ms)} ──"), markup=False)


class MessageLog(VerticalScroll):
    """The conversation view; scrolled to its top, it asks for the older page. Focused, Up and
    Down move the selection through the messages. The actions on the selected one are the
    app's Alt keys: no bare letter acts here, since a user who believes they are typing in the
    compose box must not edit, delete or quit by typing a word."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "app.select_move(-1)", "previous message", show=False),
        Binding("down", "app.select_move(1)", "next message", show=False),
        Binding("delete", "app.delete_message", "delete"),
    ]

    @dataclass
    class AtTop(Message):
        pass

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value <= 0 and old_value > 0:
            self.post_message(self.AtTop())


class Compose(TextArea):
    """Enter sends; Ctrl+N (or Alt+Enter) starts a new line; a paste goes in whole."""

    @dataclass
    class Send(Message):
        text: str

    @dataclass
    class SelectMove(Message):
        """Up in an empty box (or while a message is selected), Down while one is: move the
        selection among the messages; the focus stays here, so typing still types."""

        delta: int

    #: A message is selected (the app sets it): Up / Down move the selection.
    selecting = False
    #: Text the client put back itself (not typed): its change sends no typing notice.
    quiet_text: str | None = None

    def put_back(self, text: str) -> None:
        self.insert(text)
        self.quiet_text = self.text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Send(text))
                self.clear()
            return
        if (event.key == "up" and (self.selecting or not self.text)) or (
            event.key == "down" and self.selecting
        ):
            event.stop()
            event.prevent_default()
            self.post_message(self.SelectMove(-1 if event.key == "up" else 1))
            return
        if event.key in ("ctrl+n", "alt+enter", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
