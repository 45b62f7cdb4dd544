"""`conversations.list` and `messages.search` (docs/api.md): every conversation, one-to-one
and group, with its unread count and last message; and full-text search across all of them
(the FTS5 index inside the encrypted store, aegisd/store/search.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlcipher3

from aegisd.rpc import CallContext, InvalidParamsError, Registry
from aegisd.rpc import errors as E
from aegisd.store import conversations as C
from aegisd.store import groups as G
from aegisd.store import search as S

from .message_view import message_object, message_objects, preview

if TYPE_CHECKING:
    from .messenger import Messenger

MAX_SEARCH_PAGE = 100


def register(registry: Registry, m: Messenger) -> None:
    @registry.method("conversations.list", unlocked=True)
    async def conversations_list(ctx: CallContext) -> dict[str, Any]:
        out: list[dict[str, Any]] = []
        for s in C.contact_summaries(m.store):
            last = None
            if s.last is not None:
                last = {**_last(message_object(s.last)), "status": s.last.status}
            active = s.last.created_at if s.last else s.created_at
            out.append({"kind": "contact", "contact": s.name, "group": None, "name": s.name,
                        "unread": s.unread, "last_message": last,
                        "last_activity": active})  # fmt: skip
        # Each log parsed only when it changed (group_logs.py); of the newest message, only
        # what a list line shows (group.history's delivery counts would cost a query per
        # member).
        for ref, (name, log, created) in m.group_logs.all(m.store).items():
            rows = G.history(m.store, ref, before_seq=None, limit=1)
            last = None
            if rows:
                msg = rows[0]
                last = _last({"message_id": msg.id, "direction": msg.direction, "text": msg.body,
                              "sent_at": msg.sent_at, "created_at": msg.created_at})  # fmt: skip
                if msg.direction == "in":
                    member = log.head.member(msg.sender_key or b"")
                    c = m.contacts.with_identity(member.identity) if member else None
                    last["from"] = (msg.sender_key or b"").hex()
                    last["from_contact"] = c.name if c is not None else None
            out.append({"kind": "group", "contact": None, "group": ref, "name": name,
                        "unread": C.group_unread(m.store, ref), "last_message": last,
                        "last_activity": last["created_at"] if last else created})  # fmt: skip
        out.sort(key=lambda x: (-x["last_activity"], x["name"]))
        return {"conversations": out}

    @registry.method("messages.search", unlocked=True)
    async def messages_search(
        ctx: CallContext, query: str, contact: str | None = None, group: int | None = None,
        limit: int = 20, offset: int = 0,
    ) -> dict[str, Any]:  # fmt: skip
        if not 1 <= limit <= MAX_SEARCH_PAGE:
            raise InvalidParamsError("limit", f"must be between 1 and {MAX_SEARCH_PAGE}")
        if offset < 0:
            raise InvalidParamsError("offset", "must not be negative")
        if contact is not None and group is not None:
            raise InvalidParamsError("group", "give contact or group, not both")
        try:
            match = S.fts_query(query)
        except S.BadQuery as exc:
            raise InvalidParamsError("query", str(exc)) from None
        contact_id = m.contacts.by_name(contact).id if contact is not None else None
        if group is not None and G.get_group(m.store, group) is None:
            raise E.not_found("group")
        try:
            hits = S.search(m.store, match, contact_id=contact_id, group_ref=group,
                            limit=limit + 1, offset=offset)  # fmt: skip
        except sqlcipher3.OperationalError:
            # fts_query quotes every term, so this is not expected; still never a 500
            raise InvalidParamsError("query", "cannot be searched") from None
        more = len(hits) > limit
        logs = {}
        if any(kind == "group" for kind, _ in hits):  # each log parsed only when it changed
            logs = m.group_logs.all(m.store)
        results: list[dict[str, Any]] = []
        for kind, seq in hits[:limit]:
            if kind == "contact":
                msg = m.store.message_by_seq(seq)
                c = m.store.get_contact(msg.contact_id) if msg is not None else None
                if msg is None or c is None:
                    continue
                results.append({"kind": "contact", "contact": c.name, "group": None,
                                "group_name": None,
                                "message": message_objects(m.store, [msg])[0]})  # fmt: skip
            else:
                found = G.message_at(m.store, seq)
                if found is None or found[0] not in logs:
                    continue
                ref, row = found
                name, log, _ = logs[ref]
                item = m.groups.message_items(log, [row])[0]
                results.append({"kind": "group", "contact": None, "group": ref,
                                "group_name": name, "message": item})  # fmt: skip
        return {"results": results, "next_offset": offset + limit if more else None}


def _last(msg: dict[str, Any]) -> dict[str, Any]:
    return {
        "message_id": msg["message_id"],
        "direction": msg["direction"],
        "preview": preview(msg["text"]),
        "sent_at": msg["sent_at"],
        "created_at": msg["created_at"],
    }
