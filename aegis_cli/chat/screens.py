"""Modal screens: the key map, the passphrase, jumping to a conversation, a line of input."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from . import render

#: The one key map (the help screen shows it; README.md "Chat in the terminal" repeats it).
#: No key here is one the compose box uses itself (Ctrl+A, E, K, U, W... edit the line).
KEYS = [
    ("F1 or ?", "this help"),
    ("Tab / Shift+Tab", "move between the list, the messages and the compose box"),
    ("Up / Down", "move in the conversation list; scroll the messages"),
    ("Enter", "open the conversation (in the list); send (in the compose box)"),
    ("Ctrl+N or Alt+Enter", "a new line in the compose box"),
    ("Ctrl+G", "jump to a conversation by name (prefix, else any part)"),
    ("Ctrl+R", "contact requests: accept (a) or reject (r)"),
    ("Ctrl+O", "a one-time invitation link"),
    ("Ctrl+T", "add a contact from a link"),
    ("F2", "rename the contact (the open one, else the highlighted one)"),
    ("Ctrl+B", "block or unblock the contact (asks first)"),
    ("Ctrl+S", "the safety number: compare it, then mark the contact verified"),
    ("Ctrl+F", "send a file to the contact (its progress shows on the message)"),
    ("F4", "save the newest file received in the open conversation"),
    ("F7 / F9", "an incoming call: answer / decline (no letter key: typing never answers)"),
    ("F8", "hang up (or decline) the call"),
    ("Ctrl+L", "unlock a locked profile (asks for the passphrase)"),
    ("PageUp / scroll up", "in the messages: older ones load at the top"),
    ("Esc", "back (close a dialog; from the messages to the list)"),
    ("Ctrl+Q", "quit"),
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


class InfoScreen(ModalScreen[None]):
    """Text the user reads and copies (an invitation link); Esc or Enter closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "dismiss", "close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(render.plain(self.text + "\n\nEsc closes."), id="info", markup=False)
