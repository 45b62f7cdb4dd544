"""Conversations as the client shows them, assembled from today's API (contacts.list,
group.list and a page of history each). ``load_conversations`` is the one place a daemon's
``conversations.list`` (issue 17) will replace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aegis_client import Client

#: Messages read per conversation to find the last one and count the unread ones; beyond,
#: the count shows as "PAGE+".
PAGE = 50


@dataclass
class Conversation:
    key: str  # "c:NAME" for a contact, "g:REF" for a group
    name: str
    kind: str  # "contact" | "group"
    unread: int = 0
    unread_more: bool = False  # more unread than PAGE
    last_text: str = ""
    last_at: int = 0  # ms since the epoch; 0: no message yet
    blocked: bool = False
    verified: bool = False
    established: bool = True
    group: int | None = None
    #: Ids of the incoming messages counted already (an event may repeat a loaded one).
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


def _unread(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if m.get("direction") == "in" and m.get("status") == "received")


async def load_conversations(client: Client) -> list[Conversation]:
    """Every contact and group, newest activity first."""
    out: list[Conversation] = []
    for c in await client.contacts():
        conv = Conversation(
            contact_key(c["name"]), c["name"], "contact", blocked=bool(c["blocked"]),
            verified=bool(c["verified"]),
            established=bool(c["established"]), last_at=int(c["created_at"]),
        )  # fmt: skip
        page = await client.history(c["name"], limit=PAGE)
        msgs: list[dict[str, Any]] = list(page["messages"])  # type: ignore[arg-type]
        if msgs:
            last = msgs[-1]
            conv.last_text = str(last.get("text") or "")
            conv.last_at = int(last.get("created_at") or conv.last_at)
        conv.unread = _unread(msgs)
        conv.seen = {str(m.get("message_id")) for m in msgs}
        conv.unread_more = conv.unread >= PAGE and page["next_before"] is not None
        out.append(conv)
    for g in await client.groups():
        conv = Conversation(group_key(g["group"]), g["name"], "group", group=g["group"])
        gpage = await client.group_history(g["group"], limit=PAGE)
        if gpage["messages"]:
            last_g = gpage["messages"][-1]
            conv.last_text = str(last_g.get("text") or "")
            conv.last_at = int(last_g.get("created_at") or 0)
        conv.seen = {str(m.get("message_id")) for m in gpage["messages"]}
        conv.unread = sum(
            1 for m in gpage["messages"] if m.get("direction") == "in" and not m.get("read")
        )
        out.append(conv)
    out.sort(key=lambda x: x.last_at, reverse=True)
    return out
