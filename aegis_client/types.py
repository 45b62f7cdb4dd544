"""Typed shapes of the daemon's results and events (docs/api.md). TypedDicts: the values
are the plain JSON objects the daemon sent, so nothing is lost when the daemon adds a member."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict


class Version(TypedDict):
    version: str
    api_version: int


class RelayStatus(TypedDict):
    configured: bool | None  # None while locked: the URL is in the encrypted store
    connected: bool
    url: str | None
    reason: str | None


class Status(TypedDict):
    version: str
    api_version: int
    pid: int
    locked: bool
    has_passphrase: bool
    weak_passphrase: bool | None  # None until the passphrase was typed (unlock)
    relay: RelayStatus
    last_event_seq: int | None
    subscriptions: int


class Identity(TypedDict):
    address: str
    display_name: str
    identity_key: str


class Invitation(TypedDict):
    invitation: str
    link: str
    expires_at: int  # ms since the epoch, like every time in the API


class Contact(TypedDict):
    name: str
    verified: bool
    blocked: bool
    established: bool
    created_at: int
    timer: int  # disappearing messages: seconds, 0 off


class Request(TypedDict):
    request: int
    name: str
    safety_number: str
    created_at: int


class Sent(TypedDict):
    message_id: str
    status: str


class Quote(TypedDict):
    message_id: str
    text: str | None  # None: the original was not found here, or deleted for everyone


class Reaction(TypedDict):
    emoji: str
    count: int
    mine: bool


class Message(TypedDict):
    message_id: str
    seq: int
    direction: Literal["in", "out"]
    text: str
    status: str
    sent_at: int | None
    created_at: int
    status_at: int
    reply_to: Quote | None
    edited_at: int | None
    edits: int
    deleted: bool
    reactions: list[Reaction]
    expires_at: int | None  # disappearing: when it goes (ms); None: no deadline (yet)
    timer: int  # the message's disappearing timer, seconds (0: none)
    timer_change: NotRequired[int]  # only on a line recording a timer change: the new value


class Timer(TypedDict):
    """A conversation's disappearing-message timer (a contact's, or a group's: ``contact``
    None and ``group`` its reference)."""

    contact: str | None
    group: NotRequired[int]
    seconds: int  # 0: off
    label: str
    changed_at: int | None


class History(TypedDict):
    messages: list[Message]
    next_before: int | None


#: The newest message of a conversation (functional form: "from" is a Python keyword).
#: ``preview`` is the text shortened to one line, the sender's characters: show it safely;
#: ``status`` one-to-one only; group, incoming only: ``from`` the sender's key (hex) and
#: ``from_contact`` its contact name (None: not a contact).
LastMessage = TypedDict(
    "LastMessage",
    {
        "message_id": str,
        "direction": Literal["in", "out"],
        "preview": str,
        "sent_at": int | None,
        "created_at": int,
        "status": str,
        "from": str,
        "from_contact": str | None,
    },
    total=False,
)


class Conversation(TypedDict):
    kind: Literal["contact", "group"]
    contact: str | None  # the contact's name (kind "contact")
    group: int | None  # the group's reference (kind "group")
    name: str  # the contact's or the group's name
    unread: int  # incoming messages not marked read
    last_message: LastMessage | None
    last_activity: int  # the last message's time, else when the conversation began (ms)


class SearchHit(TypedDict):
    kind: Literal["contact", "group"]
    contact: str | None
    group: int | None
    group_name: str | None
    message: dict[str, Any]  # as messages.history (or group.history) shows it


class SearchResults(TypedDict):
    results: list[SearchHit]  # newest first
    next_offset: int | None  # the offset of the next page, None when this is the last


class GroupSummary(TypedDict):
    group: int  # this daemon's reference (the group ID never leaves the daemon)
    name: str
    members: int
    role: Literal["member", "admin", "owner"] | None  # None: no longer a member
    member: bool


class GroupMember(TypedDict):
    key: str  # Ed25519 identity key, hex
    role: Literal["member", "admin", "owner"]
    you: bool
    contact: str | None  # the contact's name, None for a group contact (hidden)
    reachable: bool  # a pairwise session with this member exists
    safety_number: str | None


class Group(TypedDict):
    group: int
    name: str
    description: str
    version: int
    role: Literal["member", "admin", "owner"] | None
    members: list[GroupMember]


class GroupInvitation(TypedDict):
    invitation: int
    name: str
    members: int
    created_at: int


class GroupSent(TypedDict):
    message_id: str
    recipients: int
    unreachable: int


class GroupReplySent(GroupSent):
    """``messages.reply`` in a group: a group message quoting another of the group."""

    group: int


class GroupFileSent(GroupSent):
    """A file to a group: one copy per member, each uploading as an attachment of its own."""

    name: str
    attachments: list[str]


class Attachment(TypedDict):
    """A file sent or received (``attachments.get``; docs/api.md, "Attachments")."""

    attachment_id: str
    contact: str | None
    direction: Literal["in", "out"]
    name: str
    size: int
    blocks: int
    done: int
    state: str
    error: str | None
    sent_at: int | None
    created_at: int
    updated_at: int
    caption: str  # "" for none; peer-supplied: show it through aegis_client.safe_text
    batch_id: str | None  # files sent together share it; None: sent alone
    batch_index: int
    batch_count: int


class FileSent(Attachment):
    message_id: str


class BatchSent(TypedDict):
    """``attachments.send_batch``: one attachment per file, in the order given."""

    batch_id: str | None
    attachments: list[FileSent]


class TypingSent(TypedDict):
    """``messages.typing``: whether a block went; if not, why (off, contact_off,
    rate_limited, not_typing)."""

    sent: bool
    reason: str | None


class TypingConfig(TypedDict):
    enabled: bool
    interval: float
    lapse: float
    counts: dict[str, int]


class GroupHistory(TypedDict):
    messages: list[dict[str, Any]]
    next_before: int | None


class Settings(TypedDict):
    read_receipts: bool
    receipt_delay_max: float
    disappearing_default: int  # seconds, 0 off


class Subscribed(TypedDict):
    subscription: str
    last_seq: int
    gap: bool


@dataclass(frozen=True)
class Event:
    """One event (docs/api.md, "Events"). ``seq`` strictly increases over the profile's life,
    except in a live event (``live``: never stored, such as ``contact.typing``), whose ``seq``
    is no number of its own and no place to resume from (docs/api.md, "Live events")."""

    seq: int
    type: str
    time_ms: int
    data: dict[str, Any] = field(default_factory=dict)
    live: bool = False

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Event:
        data = obj.get("data")
        return cls(
            seq=int(obj["seq"]),
            type=str(obj["type"]),
            time_ms=int(obj.get("time_ms") or 0),
            data=data if isinstance(data, dict) else {},
            live=obj.get("live") is True,
        )

    def to_json(self) -> dict[str, Any]:
        out = {"seq": self.seq, "type": self.type, "time_ms": self.time_ms, "data": self.data}
        if self.live:
            out["live"] = True
        return out


class Call(TypedDict, total=False):
    """A call (docs/api.md, "Calls"): calls.start / accept / reject / hangup / list. ``transport``
    appears once media started; history entries carry ``reason`` instead of ``media`` and
    ``transport``. ``ended_at`` is null until the call ended."""

    call_id: str
    contact: str
    direction: Literal["in", "out"]
    video: bool
    state: Literal["calling", "ringing", "connecting", "active", "ended"]
    reason: str | None
    created_at: int
    answered_at: int | None
    ended_at: int | None
    media: list[str]
    transport: dict[str, Any]
