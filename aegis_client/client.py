"""An asyncio client for aegisd's JSON-RPC API. Standard library only (plus aegisd.paths,
which is standard library only too): it imports no cryptography, so bots and UIs stay thin.

    async with await Client.connect(home) as c:          # or Client.connect() for the default
        print((await c.status())["locked"])
        try:
            await c.send("bob", "hi")
        except NotFound:
            ...
        async for ev in c.events(types=["message.*"]):  # reconnects and resubscribes
            ...

A connection has one reader task that hands responses to their callers by id and event
notifications to a queue, so several tasks may call methods on one Client at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

from aegisd.paths import resolve

from .errors import (
    ConnectionLost,
    DaemonNotRunning,
    InvalidParams,
    Locked,
    ProtocolError,
    from_error_object,
)
from .types import (
    BatchSent,
    Call,
    Contact,
    Conversation,
    Event,
    FileSent,
    Group,
    GroupFileSent,
    GroupHistory,
    GroupInvitation,
    GroupReplySent,
    GroupSent,
    GroupSummary,
    History,
    Identity,
    Invitation,
    Request,
    SearchResults,
    Sent,
    Settings,
    Status,
    Subscribed,
    Timer,
    TypingConfig,
    TypingSent,
    Version,
)

#: The longest line this client accepts from the daemon (a page of history can be large).
MAX_LINE = 1 << 28
Params = dict[str, Any] | list[Any] | None


def socket_path(home: str | os.PathLike[str] | None = None) -> Path:
    """The daemon's socket for ``home`` (else AEGIS_HOME, else the XDG default)."""
    return resolve(home).socket


class _Conn:
    """One connection: requests by id, notifications into ``notes`` (None when it ends)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_notes: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._wlock = asyncio.Lock()
        self.notes: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._max_notes = max_notes
        self._room = asyncio.Event()
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, path: Path, *, max_notes: int = 0) -> _Conn:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonNotRunning(str(path)) from None
        return cls(reader, writer, max_notes)

    async def _read_loop(self) -> None:
        failure: Exception = ConnectionLost("the daemon closed the connection")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    failure = ProtocolError("the daemon sent a line that is not JSON")
                    break
                if isinstance(msg, dict) and "method" in msg and "id" not in msg:
                    # A full queue (max_notes) stops reading: the daemon then sends events at
                    # the pace they are consumed, and what is not read yet waits in its store.
                    self.notes.put_nowait(msg)
                    while self._max_notes and self.notes.qsize() >= self._max_notes:
                        self._room.clear()
                        await self._room.wait()
                    continue
                if not isinstance(msg, dict):
                    continue  # a batch answer: this client never sends batches
                rid = msg.get("id")
                fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
                if fut is not None:
                    if not fut.done():
                        fut.set_result(msg)
                elif rid is None and "error" in msg:
                    # An error the daemon could not tie to a request (permission_denied, ...).
                    failure = from_error_object(msg["error"])
                    break
        except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
            pass  # ValueError: a line over MAX_LINE
        finally:
            self.closed = True
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(failure)
            self._pending.clear()
            self.notes.put_nowait(None)  # the end, after whatever was received
            self._writer.close()

    async def next_note(self) -> dict[str, Any] | None:
        """The next notification, or None once the connection has ended."""
        msg = await self.notes.get()
        if msg is None:
            self.notes.put_nowait(None)  # stays ended for later readers
        self._room.set()
        return msg

    async def request(self, method: str, params: Params = None) -> Any:
        if self.closed:
            raise ConnectionLost("the connection to the daemon is closed")
        rid = next(self._ids)
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            req["params"] = params
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            async with self._wlock:
                self._writer.write(json.dumps(req).encode() + b"\n")
                await self._writer.drain()
        except (ConnectionError, OSError):
            self._pending.pop(rid, None)
            raise ConnectionLost("the daemon closed the connection") from None
        msg = await fut
        if "error" in msg:
            exc = from_error_object(msg["error"])
            exc.set_call(method, params)
            raise exc
        if "result" not in msg:
            raise ProtocolError("a response with neither result nor error")
        return msg["result"]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class Client:
    """A connection to one daemon. Use :meth:`connect`; close it (or ``async with`` it).

    A method call is sent once: if the connection drops before the answer, the call raises
    :class:`ConnectionLost` (it may or may not have been carried out). The next call opens a
    new connection, so a Client outlives daemon restarts.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: _Conn | None = None
        self._open_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        home: str | os.PathLike[str] | None = None,
        *,
        socket: str | os.PathLike[str] | None = None,
    ) -> Client:
        """Connect to the daemon of ``home`` (a --home profile), or to ``socket``, or to the
        default profile. Raises :class:`DaemonNotRunning` when nothing answers."""
        client = cls(Path(socket) if socket is not None else socket_path(home))
        await client._connection()
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> _Conn:
        async with self._open_lock:
            if self._conn is None or self._conn.closed:
                if self._conn is not None:
                    await self._conn.close()
                self._conn = None
                # Notifications on this connection (if the caller subscribes by hand with
                # call()) are kept without bound; events() uses a connection of its own,
                # with a bound.
                self._conn = await _Conn.open(self.path)
            return self._conn

    async def call(self, method: str, params: Params = None) -> Any:
        """Call any method; its result, or an exception from aegis_client.errors."""
        conn = await self._connection()
        return await conn.request(method, params)

    async def notification(self) -> dict[str, Any] | None:
        """The next notification on this connection (after a manual events.subscribe),
        or None once the connection has ended."""
        conn = await self._connection()
        return await conn.next_note()

    def events(
        self,
        types: list[str] | None = None,
        since: int | None = None,
        *,
        reconnect: bool = True,
        max_delay: float = 2.0,
    ) -> EventStream:
        """Events from ``since`` on (None: from now on), over a connection of their own,
        reconnecting and resubscribing from the last event handed out (no gap, no
        duplicate) when the daemon restarts. ``reconnect=False``: end with ConnectionLost."""
        return EventStream(self.path, types, since, reconnect=reconnect, max_delay=max_delay)

    # -- typed methods (docs/api.md) ---------------------------------------------------------

    async def version(self) -> Version:
        return cast(Version, await self.call("version"))

    async def status(self) -> Status:
        return cast(Status, await self.call("status"))

    async def unlock(self, passphrase: str | None = None) -> None:
        await self.call("unlock", {} if passphrase is None else {"passphrase": passphrase})

    async def lock(self) -> None:
        await self.call("lock")

    async def discover(self) -> dict[str, Any]:
        """The OpenRPC description of the methods this daemon serves."""
        return cast(dict[str, Any], await self.call("rpc.discover"))

    async def identity(self) -> Identity:
        return cast(Identity, await self.call("identity.get"))

    async def set_name(self, display_name: str) -> str:
        r = await self.call("identity.set_name", {"display_name": display_name})
        return str(r["display_name"])

    async def create_invitation(self, expires_in: int | None = None) -> Invitation:
        params = {} if expires_in is None else {"expires_in": expires_in}
        return cast(Invitation, await self.call("invitations.create", params))

    async def address(self) -> str:
        return str((await self.call("address.get"))["link"])

    async def requests(self) -> list[Request]:
        return cast(list[Request], (await self.call("requests.list"))["requests"])

    async def accept(self, request: int, name: str | None = None) -> Contact:
        params: dict[str, Any] = {"request": request}
        if name is not None:
            params["name"] = name
        return cast(Contact, await self.call("requests.accept", params))

    async def add_contact(self, name: str, link: str) -> Contact:
        return cast(Contact, await self.call("contacts.add", {"name": name, "link": link}))

    async def contacts(self) -> list[Contact]:
        return cast(list[Contact], (await self.call("contacts.list"))["contacts"])

    async def send(self, contact: str, text: str) -> Sent:
        return cast(Sent, await self.call("messages.send", {"contact": contact, "text": text}))

    async def reply(self, contact: str, message_id: str, text: str) -> Sent:
        """A text quoting ``message_id`` of the conversation (messages.reply)."""
        params = {"contact": contact, "message_id": message_id, "text": text}
        return cast(Sent, await self.call("messages.reply", params))

    async def group_reply(self, group: int, message_id: str, text: str) -> GroupReplySent:
        """A group message quoting ``message_id`` of the group (messages.reply, ``group``)."""
        params = {"group": group, "message_id": message_id, "text": text}
        return cast(GroupReplySent, await self.call("messages.reply", params))

    async def react(self, message_id: str, emoji: str, *, group: int | None = None) -> None:
        """Set your reaction to a message (with ``group``: a message of that group); ``""``
        removes it (messages.react)."""
        params: dict[str, Any] = {"message_id": message_id, "emoji": emoji}
        await self.call("messages.react", _in_group(params, group))

    async def edit(self, message_id: str, text: str, *, group: int | None = None) -> int:
        """Edit one of your messages; returns when it was edited, ms (messages.edit)."""
        params: dict[str, Any] = {"message_id": message_id, "text": text}
        result = await self.call("messages.edit", _in_group(params, group))
        return int(result["edited_at"])

    async def delete(self, message_id: str, *, for_everyone: bool = False,
                     group: int | None = None) -> None:  # fmt: skip
        """Delete a message here, or (``for_everyone``, your own) at the contact's (every
        member's) too."""
        params: dict[str, Any] = {"message_id": message_id, "for_everyone": for_everyone}
        await self.call("messages.delete", _in_group(params, group))

    async def history(
        self, contact: str, *, limit: int = 50, before: int | None = None
    ) -> History:
        params: dict[str, Any] = {"contact": contact, "limit": limit}
        if before is not None:
            params["before"] = before
        return cast(History, await self.call("messages.history", params))

    async def mark_read(self, contact: str, message_ids: list[str] | None = None) -> int:
        params: dict[str, Any] = {"contact": contact}
        if message_ids is not None:
            params["message_ids"] = message_ids
        return int((await self.call("messages.mark_read", params))["marked"])

    async def conversations(self) -> list[Conversation]:
        """Every conversation (contacts and groups) with its unread count and last message,
        the most recently active first."""
        return cast(list[Conversation], (await self.call("conversations.list"))["conversations"])

    async def search(
        self, query: str, *, contact: str | None = None, group: int | None = None,
        limit: int = 20, offset: int = 0,
    ) -> SearchResults:  # fmt: skip
        """Messages holding every word and "quoted phrase" of ``query``, newest first;
        ``InvalidParams`` (field ``query``) when it has nothing to search for."""
        params: dict[str, Any] = {"query": query, "limit": limit, "offset": offset}
        if contact is not None:
            params["contact"] = contact
        if group is not None:
            params["group"] = group
        return cast(SearchResults, await self.call("messages.search", params))
    async def send_file(self, contact: str, path: str, caption: str | None = None) -> FileSent:
        """``path``: absolute (the daemon opens it); ``caption``: at most 2048 bytes."""
        params = {"contact": contact, "path": path, "caption": caption}
        return cast(FileSent, await self.call("attachments.send", params))

    async def send_files(
        self, contact: str, paths: list[str], caption: str | None = None
    ) -> BatchSent:
        """Up to 32 files in one send, each its own upload; the caption goes with the first."""
        params = {"contact": contact, "paths": paths, "caption": caption}
        return cast(BatchSent, await self.call("attachments.send_batch", params))

    async def typing(self, contact: str, typing: bool) -> TypingSent:
        """Tell the contact the user is typing (True) or stopped (False); the daemon sends
        only when both sides have typing indicators on, at most one "typing" per 5 s."""
        params = {"contact": contact, "typing": typing}
        return cast(TypingSent, await self.call("messages.typing", params))

    async def typing_config(self, enabled: bool | None = None) -> TypingConfig:
        params = {} if enabled is None else {"enabled": enabled}
        return cast(TypingConfig, await self.call("typing.config", params))

    async def settings(self) -> Settings:
        return cast(Settings, await self.call("settings.get"))

    async def set_timer(self, contact: str, seconds: int) -> Timer:
        """Set the conversation's disappearing-message timer (0: off); both sides see it."""
        params = {"contact": contact, "seconds": seconds}
        return cast(Timer, await self.call("conversations.set_timer", params))

    async def get_timer(self, contact: str) -> Timer:
        return cast(Timer, await self.call("conversations.get_timer", {"contact": contact}))

    async def set_group_timer(self, group: int, seconds: int) -> Timer:
        """Set a group's disappearing-message timer (0: off); any member may, all see it."""
        params = {"group": group, "seconds": seconds}
        return cast(Timer, await self.call("conversations.set_timer", params))

    async def get_group_timer(self, group: int) -> Timer:
        return cast(Timer, await self.call("conversations.get_timer", {"group": group}))

    async def events_list(
        self, since: int = 0, limit: int = 100, types: list[str] | None = None
    ) -> list[Event]:
        r = await self.call("events.list", {"since": since, "limit": limit, "types": types})
        return [Event.from_json(e) for e in r["events"]]

    # -- groups (docs/api.md, "Groups"): a group is named by its reference ``group`` ----------

    async def create_group(self, name: str, description: str = "") -> Group:
        return cast(
            Group, await self.call("group.create", {"name": name, "description": description})
        )

    async def invite_to_group(self, group: int, contact: str) -> dict[str, Any]:
        return cast(
            dict[str, Any], await self.call("group.invite", {"group": group, "contact": contact})
        )

    async def group_invitations(self) -> list[GroupInvitation]:
        r = await self.call("group.invitations")
        return cast(list[GroupInvitation], r["invitations"])

    async def accept_group(self, invitation: int) -> Group:
        return cast(Group, await self.call("group.accept", {"invitation": invitation}))

    async def decline_group(self, invitation: int) -> None:
        await self.call("group.decline", {"invitation": invitation})

    async def groups(self) -> list[GroupSummary]:
        return cast(list[GroupSummary], (await self.call("group.list"))["groups"])

    async def group(self, group: int) -> Group:
        return cast(Group, await self.call("group.get", {"group": group}))

    async def remove_from_group(self, group: int, member: str) -> Group:
        """``member``: an identity key (hex, as ``group`` shows it) or a contact's name."""
        return cast(Group, await self.call("group.remove", {"group": group, "member": member}))

    async def set_group_role(
        self, group: int, member: str, role: Literal["member", "admin", "owner"]
    ) -> Group:
        params = {"group": group, "member": member, "role": role}
        return cast(Group, await self.call("group.role", params))

    async def rename_group(self, group: int, name: str, description: str | None = None) -> Group:
        params = {"group": group, "name": name, "description": description}
        return cast(Group, await self.call("group.rename", params))

    async def leave_group(self, group: int) -> bool:
        """True when the group was deleted (its only member left)."""
        return bool((await self.call("group.leave", {"group": group}))["deleted"])

    async def send_to_group(self, group: int, text: str) -> GroupSent:
        return cast(GroupSent, await self.call("group.send", {"group": group, "text": text}))

    async def send_file_to_group(
        self, group: int, path: str, caption: str | None = None
    ) -> GroupFileSent:
        """``path``: absolute (the daemon opens it). Each member's copy uploads in the
        background (its attachment in ``attachments``); the member gets it when it is up."""
        params: dict[str, Any] = {"group": group, "path": path}
        if caption:
            params["caption"] = caption
        return cast(GroupFileSent, await self.call("group.send_file", params))

    async def mark_group_read(
        self, group: int, up_to: str | None = None, message_ids: list[str] | None = None
    ) -> int:
        """Mark the group's incoming messages read (up to the message ``up_to``, else all;
        only those among ``message_ids`` when given); each author is sent a read receipt
        unless they are off. Returns how many."""
        params: dict[str, Any] = {"group": group, "up_to": up_to}
        if message_ids is not None:
            params["message_ids"] = message_ids
        return int((await self.call("group.read", params))["marked"])

    async def group_history(
        self, group: int, *, limit: int = 50, before: int | None = None
    ) -> GroupHistory:
        params: dict[str, Any] = {"group": group, "limit": limit, "before": before}
        return cast(GroupHistory, await self.call("group.history", params))

    # -- calls (docs/api.md, "Calls"): play/record are absolute paths the daemon opens --------

    async def start_call(
        self, contact: str, *, video: bool = False, play: str | None = None,
        record: str | None = None, reveal_ip: bool = False,
    ) -> Call:  # fmt: skip
        """``reveal_ip``: allow a call that shows the user's IP address to the contact, when
        relays are reached through Tor or a proxy without TURN hide-my-IP (else RevealsIp)."""
        params = {"contact": contact, "video": video, "play": play, "record": record,
                  "reveal_ip": reveal_ip}  # fmt: skip
        return cast(Call, await self.call("calls.start", params))

    async def answer_call(
        self, call_id: str | None = None, *, play: str | None = None, record: str | None = None,
        reveal_ip: bool = False,
    ) -> Call:
        params = {"call_id": call_id, "play": play, "record": record, "reveal_ip": reveal_ip}
        return cast(Call, await self.call("calls.accept", params))

    # -- network (docs/api.md, "Network") ---------------------------------------------------------

    async def network(self) -> dict[str, Any]:
        """The network mode, proxy, isolation, bridges and the managed Tor's state."""
        return cast(dict[str, Any], await self.call("network.get"))

    async def set_network(self, **changes: Any) -> dict[str, Any]:
        """``mode`` (tor, proxy, direct), ``proxy``, ``isolation``, ``bridges``, ``tor_path``."""
        return cast(dict[str, Any], await self.call("network.set", changes))

    async def set_relay(self, url: str, *, insecure_plaintext: bool = False) -> dict[str, Any]:
        params = {"url": url, "insecure_plaintext": insecure_plaintext}
        return cast(dict[str, Any], await self.call("relay.set", params))

    async def reject_call(self, call_id: str | None = None) -> Call:
        return cast(Call, await self.call("calls.reject", {"call_id": call_id}))

    async def hangup(self, call_id: str | None = None) -> Call:
        return cast(Call, await self.call("calls.hangup", {"call_id": call_id}))

    async def calls(self) -> list[Call]:
        return cast(list[Call], (await self.call("calls.list"))["calls"])

    async def call_history(self, contact: str | None = None, limit: int = 50) -> list[Call]:
        r = await self.call("calls.history", {"contact": contact, "limit": limit})
        return cast(list[Call], r["calls"])


class EventStream(AsyncIterator[Event]):
    """``async for ev in stream``: events in sequence order, each once, across reconnects
    (live events, ``ev.live``, as they come while connected: lost while not).

    ``last_seq`` is the sequence number of the last event handed out; the stream resubscribes
    with ``since=last_seq`` after a reconnect. While the daemon is down or locked it retries,
    backing off up to ``max_delay`` seconds. A ``since`` greater than the daemon's last
    sequence number (a different profile) raises :class:`InvalidParams`.
    """

    #: Events received but not yet handed out, per connection. Beyond, the reader stops and
    #: the daemon keeps the rest in its store.
    QUEUE = 256

    def __init__(
        self,
        path: Path,
        types: list[str] | None,
        since: int | None,
        *,
        reconnect: bool = True,
        max_delay: float = 2.0,
    ) -> None:
        self.path = path
        self.types = list(types) if types else None
        self.last_seq = since
        self.reconnect = reconnect
        self.max_delay = max_delay
        #: Whether the daemon said events after ``since`` were pruned (never, today).
        self.gap = False
        #: How many times the stream (re)subscribed.
        self.subscriptions = 0
        self._conn: _Conn | None = None
        self._sub: str | None = None
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def start(self) -> None:
        """Subscribe now (iterating does it otherwise): events from here on are not missed."""
        if self._conn is None and not self._closed:
            await self._subscribe()

    async def __anext__(self) -> Event:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._conn is None:
                await self._subscribe()
            assert self._conn is not None
            msg = await self._conn.next_note()
            if msg is None:
                await self._drop()
                if not self.reconnect:
                    raise ConnectionLost("the daemon closed the connection")
                continue
            params = msg.get("params")
            if msg.get("method") != "event" or not isinstance(params, dict):
                continue
            if params.get("subscription") != self._sub:
                continue
            try:
                ev = Event.from_json(params)
            except (KeyError, TypeError, ValueError):
                raise ProtocolError("an event without a valid seq or type") from None
            if ev.live:
                return ev  # never stored: not counted, never replayed, so never twice
            if self.last_seq is not None and ev.seq <= self.last_seq:
                continue  # already handed out: never twice
            self.last_seq = ev.seq
            return ev

    async def _subscribe(self) -> None:
        delay = 0.05
        while True:
            conn: _Conn | None = None
            try:
                conn = await _Conn.open(self.path, max_notes=self.QUEUE)
                params: dict[str, Any] = {}
                if self.types is not None:
                    params["types"] = self.types
                if self.last_seq is not None:
                    params["since"] = self.last_seq
                res = cast(Subscribed, await conn.request("events.subscribe", params))
                if self.last_seq is None:
                    self.last_seq = int(res["last_seq"])
                self._sub = str(res["subscription"])
                self.gap = self.gap or bool(res.get("gap"))
                self._conn = conn
                self.subscriptions += 1
                return
            except InvalidParams:
                if conn is not None:
                    await conn.close()
                raise
            except (DaemonNotRunning, ConnectionLost, Locked, OSError):
                if conn is not None:
                    await conn.close()
                if not self.reconnect:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)

    async def _drop(self) -> None:
        conn, self._conn, self._sub = self._conn, None, None
        if conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()


def _in_group(params: dict[str, Any], group: int | None) -> dict[str, Any]:
    """``params`` with ``group`` when a group's message is meant."""
    return params if group is None else {**params, "group": group}
