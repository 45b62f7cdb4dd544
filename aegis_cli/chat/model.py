"""Conversations as the client shows them: one ``conversations.list`` (unread counts, the last
message, newest activity first) and one ``contacts.list`` (the flags a contact's row shows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aegis_client import Client


@dataclass
class Conversation:
    key: str  # "c:NAME" for a contact, "g:REF" for a group
    name: str
    kind: str  # "contact" | "group"
    unread: int = 0
    last_text: str = ""
    last_at: int = 0  # ms since the epoch; 0: no message yet
    blocked: bool = False
    verified: bool = False
    established: bool = True
    group: int | None = None
    #: The disappearing timer in seconds (0: off); a contact's only.
    timer: int = 0
    #: Ids of the incoming messages counted already (an event may repeat the loaded last one).
    seen: set[str] = field(default_factory=set)

    def note_message(self, text: str, at: int, incoming: bool) -> None:
        self.last_text = text
        self.last_at = max(self.last_at, at)
        if incoming:
            self.unread += 1


def contact_key(name: str) -> str:
    return f"c:{name}"


def group_key(ref: int) -> str:
    return f"g:{ref}"


async def load_conversations(client: Client) -> list[Conversation]:
    """Every contact and group, newest activity first (the daemon's order)."""
    contacts = {c["name"]: c for c in await client.contacts()}
    out: list[Conversation] = []
    for v in await client.conversations():
        last: dict[str, Any] = dict(v["last_message"] or {})
        if v["kind"] == "group":
            ref = int(v["group"] or 0)
            conv = Conversation(group_key(ref), v["name"], "group", group=ref)
        else:
            name = str(v["contact"])
            c: dict[str, Any] = dict(contacts.get(name) or {})
            conv = Conversation(
                contact_key(name), name, "contact", blocked=bool(c.get("blocked")),
                verified=bool(c.get("verified")), established=bool(c.get("established", True)),
                timer=int(c.get("timer") or 0),
            )  # fmt: skip
        conv.unread = int(v["unread"])
        conv.last_at = int(v["last_activity"])
        conv.last_text = str(last.get("preview") or "")
        if last.get("message_id"):
            conv.seen.add(str(last["message_id"]))
        out.append(conv)
    return out
