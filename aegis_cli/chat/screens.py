"""Modal screens: the key map, the passphrase, jumping to a conversation, a line of input."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, ListItem, ListView, Static

from . import render

#: The one key map (the help screen shows it; README.md "Chat in the terminal" repeats it).
#: No key here is one the compose box uses itself (Ctrl+A, E, K, U, W... edit the line), and
#: no bare letter acts on a message or quits where a user may be typing.
KEYS = [
    ("F1 or ?", "this help"),
    ("Tab / Shift+Tab", "move between the list, the messages and the compose box"),
    ("Up / Down", "move in the conversation list; in the messages, select one"),
    ("Up (empty compose box)", "select the newest message; Up / Down then move, Esc drops it"),
    ("Alt+R", "on the selected message: reply (its quote shows above the compose box)"),
    ("Alt+= or Alt++", "on the selected message: react (a common emoji by number, or any)"),
    ("Alt+E", "on the selected message of yours: edit it (within 24 hours)"),
    ("Alt+X", "on the selected message: delete it, for you or for everyone (Delete too, in"
     " the messages)"),
    ("click", "on a message: select it (the compose box keeps the focus)"),
    ("F3", "search every conversation; Enter on a result opens it"),
    ("F5", "the disappearing timer: off / 5 min / 1 h / 1 day / 1 week"),
    ("Enter", "open the conversation (in the list); send (in the compose box)"),
    ("Ctrl+N or Alt+Enter", "a new line in the compose box"),
    ("Ctrl+G", "jump to a conversation by name (prefix, else any part)"),
    ("Ctrl+R", "contact requests and group invitations: accept or decline"),
    ("Ctrl+O", "a one-time invitation: its link and QR code (arrows scroll)"),
    ("Ctrl+T", "add a contact from a link"),
    ("F2", "rename the contact (the open one, else the highlighted one)"),
    ("Ctrl+B", "block or unblock the contact (asks first)"),
    ("Ctrl+S", "the safety number: compare it, then mark the contact verified"),
    ("Ctrl+F", "send files to the contact or the open group, with a caption (a contact's:"
     " progress shows on the message)"),
    ("F4", "save a file received in the open conversation (any: by number; Enter: newest)"),
    ("Alt+D", "remove the contact, its messages and files (asks first)"),
    ("Alt+G", "the open (else highlighted) group: members and roles; invite, remove, admin,"
     " rename, leave; with none there, a new group"),
    ("Ctrl+P", "call the contact: type voice or video; its state shows in the status line"),
    ("F7 / F9", "an incoming call: answer / decline (no letter key: typing never answers)"),
    ("F8", "hang up (or decline, or cancel) the call"),
    ("Alt+V", "devices: this profile's devices; link a new one (its link, QR code, then type"
     " the code the new device shows); remove one"),
    ("F12", "settings: typing indicators; the timer new conversations start with"),
    ("Ctrl+L", "unlock a locked profile (asks for the passphrase)"),
    ("PageUp / scroll up", "in the messages: older ones load at the top"),
    ("Esc", "back (close a dialog; drop a reply or edit; from the messages to the list)"),
    ("Ctrl+Q", "quit (q too, in the list before a conversation is opened)"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f1,question_mark,q", "dismiss", "close")
    ]

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in KEYS)
        text = "Keys (Esc closes; arrows scroll)\n\n" + "\n".join(
            f"{k.ljust(width)}  {v}" for k, v in KEYS
        )
        with VerticalScroll(id="help-box"):  # taller than 24 rows: it scrolls
            yield Static(render.plain(text), id="help", markup=False)

    def on_mount(self) -> None:
        self.query_one("#help-box").focus()


class AskScreen(ModalScreen[str | None]):
    """One line of input: Enter gives it, Esc gives None. ``password``: not echoed."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]

    def __init__(self, prompt: str, *, password: bool = False, value: str = "") -> None:
        super().__init__()
        self.prompt = prompt
        self.password = password
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Static(render.plain(self.prompt), markup=False, id="ask-prompt")
            yield Input(value=self.value, password=self.password, id="ask-input")
            yield Static(render.plain(""), markup=False, id="ask-error")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def show_error(self, text: str) -> None:
        self.query_one("#ask-error", Static).update(render.plain(text))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class CallScreen(ModalScreen[str | None]):
    """An incoming call: F7 answers, F9 declines, Esc lets it ring (F8 hangs up later).

    No printable key answers: the call takes the focus when it rings, and a letter the user
    was typing into the compose box must not switch the microphone on (the caller picks the
    moment)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f7", "choose('answer')", "answer"),
        Binding("f9", "choose('decline')", "decline"),
        Binding("escape", "choose(None)", "later"),
    ]

    def __init__(self, who: str, video: bool) -> None:
        super().__init__()
        self.text = (
            f"{'Video call' if video else 'Call'} from “{who}”\n\n"
            "F7: answer   F9: decline   Esc: let it ring (F8 then ends it)"
        )

    def compose(self) -> ComposeResult:
        yield Static(render.plain(self.text), id="info", markup=False)

    def action_choose(self, what: str | None) -> None:
        self.dismiss(what)


#: A device link's states in the order they come (a late answer never moves one back).
LINK_ORDER = {"waiting": 0, "code": 1, "confirmed": 2}
LINK_OVER = ("done", "declined", "expired", "failed")


def link_state_text(st: dict[str, Any]) -> str:
    """What the link screen says of a device link's state (devices.status, devices.link)."""
    state = str(st.get("state") or "")
    if state == "waiting":
        return ("Waiting for the new device: on it, run\n"
                "  aegis init --home DIR --relay URL --link LINK\n"
                "with the link below (it works once, for minutes). Esc: cancel the link.")
    if state == "code":
        return ("The new device shows a code of 6 digits. Type it below and press Enter: that\n"
                "gives the new device this profile's identity key and contacts. Only the\n"
                "code the NEW device shows links it; a wrong code ends the link (someone\n"
                "else may hold the link).  F9: decline   Esc: cancel the link")  # fmt: skip
    if state == "confirmed":
        return "Confirmed here: waiting for the new device to confirm too. Esc: cancel."
    if state == "done":
        return "Linked: the new device has your identity and contacts. Esc closes."
    if state == "declined":
        return "Declined: nothing was sent. Esc closes."
    if state == "expired" and "not listed" in str(st.get("reason") or ""):
        return ("The link expired: the new device never said it installed the profile, so it\n"
                "is not listed. Esc closes.")  # fmt: skip
    if state == "expired":
        return "The link expired: nothing was sent. Esc closes."
    reason = render.name(st.get("reason") or "", 80)
    return f"The link failed{': ' + reason if reason else ''}. Esc closes."


#: The code a new device shows (docs/devices.md §4.3): what the code field accepts.
LINK_CODE_DIGITS = 6


def link_code(typed: str) -> str | None:
    """The code as typed (spaces allowed), or None if it is not 6 ASCII digits: anything else
    is never sent (a stray Enter or a pasted link must not end, or answer, the link)."""
    digits = "".join(typed.split())
    ok = len(digits) == LINK_CODE_DIGITS and digits.isascii() and digits.isdigit()
    return digits if ok else None


class LinkScreen(ModalScreen[None]):
    """Linking a new device: the state at the top, then the link and its QR code (it scrolls
    in 80x24). Once the new device has answered, a field takes the code the NEW device shows
    (this device never shows it: docs/api.md, devices.confirm); Enter sends it, and only 6
    digits are ever sent. F9 declines, Esc cancels the link unless it is over. The app feeds
    it the daemon's ``devices.link`` states (``show_state``) and does the answers
    (``answer`` with the code, or None to decline; ``cancel``)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f9", "decline", "decline"),
        Binding("escape", "close", "cancel / close"),
    ]

    def __init__(
        self, text: str, answer: Callable[[str | None], Awaitable[None]],
        cancel: Callable[[], Awaitable[None]],
    ) -> None:  # fmt: skip
        super().__init__()
        self.text = text
        self.answer = answer
        self.cancel = cancel
        self.state: dict[str, Any] = {"state": "waiting"}
        self.answered = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="info-box"):
            yield Static(render.plain(link_state_text(self.state)), id="link-state",
                         markup=False)  # fmt: skip
            yield Input(placeholder="the code the new device shows", id="link-code",
                        max_length=16)  # fmt: skip
            yield Static(render.plain(self.text), id="info", markup=False)

    def on_mount(self) -> None:
        self.query_one("#link-code", Input).display = False
        self.query_one("#info-box").focus()

    @property
    def over(self) -> bool:
        return self.state.get("state") in LINK_OVER

    def show_state(self, st: dict[str, Any] | None) -> None:
        if st is None or self.over:
            return
        new = str(st.get("state") or "")
        if LINK_ORDER.get(new, 9) < LINK_ORDER.get(str(self.state.get("state")), 9):
            return  # an answer that came after a later event
        self.state = dict(st)
        self.query_one("#link-state", Static).update(render.plain(link_state_text(self.state)))
        field = self.query_one("#link-code", Input)
        field.display = new == "code" and not self.answered
        if field.display:
            self.query_one("#info-box", VerticalScroll).scroll_home(animate=False)
            field.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "decline":
            return self.state.get("state") == "code" and not self.answered
        return True

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.state.get("state") != "code" or self.answered:
            return
        code = link_code(event.value)
        if code is None:
            self.notify("Type the 6 digits the new device shows.", markup=False)
            return
        self.answered = True
        event.input.display = False
        await self.answer(code)

    async def action_decline(self) -> None:
        if self.state.get("state") != "code" or self.answered:
            return
        self.answered = True
        self.query_one("#link-code", Input).display = False
        await self.answer(None)

    async def action_close(self) -> None:
        if not self.over:
            await self.cancel()
        self.dismiss(None)


class InfoScreen(ModalScreen[None]):
    """Text the user reads and copies (an invitation link, its QR code); Esc or Enter closes
    it; taller than the terminal (a QR code in 80x24), it scrolls."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "dismiss", "close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="info-box"):
            yield Static(render.plain(self.text + "\n\nEsc closes."), id="info", markup=False)

    def on_mount(self) -> None:
        self.query_one("#info-box").focus()


#: Reactions offered by number in the picker (any other can be typed).
EMOJI = ("👍", "❤️", "😂", "😮", "😢", "🙏")


def react_prompt() -> str:
    offered = "   ".join(f"{i} {e}" for i, e in enumerate(EMOJI, 1))
    return f"React: {offered}\n\nA number, or type any emoji; empty removes yours (Esc: none)."


def picked_emoji(answer: str) -> str:
    """The picker's answer as the emoji to send ("" removes)."""
    a = answer.strip()
    if a.isascii() and a.isdigit() and 1 <= int(a) <= len(EMOJI):
        return EMOJI[int(a) - 1]
    return a  # "²" or "①" too: sent as typed (the daemon checks it is one emoji)


class SearchHit(ListItem):
    def __init__(self, hit: dict[str, Any], line: str) -> None:
        self.hit = hit
        self.plain_line = line
        super().__init__(Static(render.plain(line), markup=False))


class SearchScreen(ModalScreen[dict[str, Any] | None]):
    """A search box and its results (conversation, time, text); Enter in the box searches,
    Enter on a result gives it; Esc gives None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]

    def __init__(
        self, search: Callable[[str], Awaitable[list[tuple[dict[str, Any], str]]]]
    ) -> None:
        super().__init__()
        self.search = search

    def compose(self) -> ComposeResult:
        with Vertical(id="search"):
            yield Static(render.plain("Search every conversation (Enter):"), markup=False)
            yield Input(id="search-input")
            yield Static(render.plain(""), markup=False, id="search-note")
            yield ListView(id="search-results")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        note = self.query_one("#search-note", Static)
        results = self.query_one("#search-results", ListView)
        await results.clear()
        try:
            hits = await self.search(event.value)
        except ValueError as exc:  # the query has nothing to search for, or too much
            note.update(render.plain(render.name(str(exc), 200)))
            return
        note.update(render.plain(f"{len(hits)} found{'' if not hits else ': Enter opens one'}"))
        await results.extend(SearchHit(hit, line) for hit, line in hits)
        if hits:
            results.index = 0
            results.focus()

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, SearchHit):
            self.dismiss(event.item.hit)

    def action_cancel(self) -> None:
        self.dismiss(None)
