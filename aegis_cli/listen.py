"""``aegis listen``: the daemon's events, one line each, across daemon restarts.

The cursor works as in ``aegis_client.EventStream``: the subscription starts after ``--since``
(or now), the last printed event's seq is remembered, and after the daemon stops, restarts
or is locked the CLI subscribes again with ``since`` set to it, so that every event is printed
once, in order (live events, such as ``contact.typing``, are printed as they come and are not
counted: docs/api.md, "Live events"). Lines for people give the local time, who and what;
``--json`` prints each event as ``events.list`` gives it (``{"seq", "type", "time_ms",
"data"}``, and ``"live": true`` for a live one), one per line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from aegis_client import safe_text
from aegis_client.errors import Locked

from .client import Client
from .units import size_text, when

#: Back-off between attempts to reach the daemon again (seconds), as aegis_client's.
FIRST_DELAY = 0.05
MAX_DELAY = 2.0


def _text(value: Any) -> str:
    """Peer-supplied text for a terminal: no control or bidi character, continuation lines
    indented (aegis_client.safe_text)."""
    return safe_text.body(value)


def _who(data: dict[str, Any]) -> str:
    return safe_text.one_line(data.get("contact") or "-")


def describe(ev: dict[str, Any]) -> str:
    """One event as a line for people: local time, who (a contact, or the part of the
    daemon), what happened."""
    kind = str(ev.get("type"))
    raw = ev.get("data")
    d: dict[str, Any] = raw if isinstance(raw, dict) else {}
    who = _who(d)
    short = str(d.get("message_id") or d.get("attachment_id") or d.get("call_id") or "")[:8]
    what: str
    if kind == "message.received":
        what = f"{who}: {_text(d.get('text', ''))}"
    elif kind == "message.edited":
        what = f"{who}: edited message {short}: {_text(d.get('text', ''))}"
    elif kind == "message.reaction":
        emoji = d.get("emoji")
        what = (f"{who}: reacted {_text(emoji)} to message {short}" if emoji
                else f"{who}: removed a reaction to message {short}")  # fmt: skip
    elif kind == "message.deleted":
        what = f"{who}: deleted message {short} for everyone"
    elif kind == "message.status":
        what = f"me -> {who}: message {short} {d.get('status')}"
    elif kind == "message.expired":
        what = f"{who}: message {short} disappeared (its timer ran out)"
    elif kind == "conversation.timer":
        from .disappear import timer_text

        setter = "you" if d.get("by") == "self" else who
        seconds = d.get("seconds")
        value = timer_text(seconds) if isinstance(seconds, int) else "?"
        what = f"{who}: {setter} set disappearing messages to {value}"
    elif kind == "contact.added":
        state = "you can send" if d.get("established") else "waiting for their answer"
        what = f"{who}: added as a contact ({state})"
    elif kind == "contact.established":
        what = f"{who}: contact established: you can send"
    elif kind == "contact.request":
        known = " (already a contact)" if d.get("known") else ""
        what = (f"contact request {d.get('request')} from {_text(d.get('name'))}{known}: "
                f"aegis accept {d.get('request')}")  # fmt: skip
    elif kind == "contact.failed":
        what = f"{who}: could not be added: {_text(d.get('reason'))}"
    elif kind == "contact.mailbox_rotated":
        what = f"{who}: mailbox rotated"
    elif kind == "contact.devices":
        n = d.get("devices")
        what = f"{who}: now on {n} device{'' if n == 1 else 's'} (messages to them reach each)"
    elif kind == "contact.session_renewing":
        what = f"{who}: renewing the session after a backup restore"
    elif kind == "contact.session_renewed":
        what = f"{who}: session renewed"
    elif kind == "contact.renewal_failed":
        what = f"{who}: session renewal failed: {_text(d.get('reason'))}"
    elif kind == "attachment.received":
        # direction out: a file another device of ours sent to the contact, fetched here.
        ours = d.get("direction") == "out"
        what = (f"{'me -> ' if ours else ''}{who}: file {_text(d.get('name'))} "
                f"({size_text(int(d.get('size') or 0))}) "
                f"{'sent from another device, fetching' if ours else 'arriving'}, "
                f"id {d.get('attachment_id')}")  # fmt: skip
        if int(d.get("batch_count") or 1) > 1:
            what += f" ({int(d.get('batch_index') or 0) + 1} of {int(d['batch_count'])})"
        if d.get("caption"):
            what += f": {_text(d.get('caption'))}"
    elif kind == "contact.typing":
        what = f"{who}: {'typing' if d.get('typing') else 'stopped typing'}"
    elif kind == "attachment.progress":
        arrow = "me -> " if d.get("direction") == "out" else ""
        what = f"{arrow}{who}: file {short} {d.get('done')}/{d.get('total')} blocks"
    elif kind == "attachment.completed":
        arrow = "me -> " if d.get("direction") == "out" else ""
        what = f"{arrow}{who}: file {short} complete"
    elif kind == "attachment.failed":
        arrow = "me -> " if d.get("direction") == "out" else ""
        what = f"{arrow}{who}: file {short} failed: {_text(d.get('reason'))}"
    elif kind == "call.incoming":
        video = "video " if d.get("video") else ""
        what = f"{who}: {video}call ringing: aegis answer {d.get('call_id')}"
    elif kind == "call.state":
        reason = f" ({_text(d['reason'])})" if d.get("reason") else ""
        what = f"{who}: call {d.get('state')}{reason}"
    elif kind == "call.media":
        what = f"{who}: call {d.get('kind')} arriving"
    elif kind == "call.missed":
        what = f"{who}: missed call ({d.get('reason')})"
    elif kind == "group.message":
        sender = _text(d.get("from_contact") or str(d.get("from") or "")[:12])
        what = f"group #{d.get('group')}  {sender}: {_text(d.get('text', ''))}"
    elif kind == "group.invitation":
        what = (f"group invitation {d.get('invitation')}: {_text(d.get('name'))} from "
                f"{_text(d.get('from'))}: aegis group accept {d.get('invitation')}")  # fmt: skip
    elif kind == "group.changed":
        by = f" ({_text(d['contact'])})" if d.get("contact") else ""
        what = f"group #{d.get('group')}: {d.get('change')}{by}"
    elif kind == "group.receipt":
        what = f"group message {short} {d.get('status')}"
    elif kind == "relay.up":
        what = "relay: connected"
    elif kind == "relay.down":
        what = f"relay: not connected: {_text(d.get('reason') or 'connecting')}"
    elif kind == "tor.bootstrap":
        what = f"tor: {d.get('progress')}% {_text(d.get('summary') or '')}".rstrip()
    elif kind == "tor.failed":
        what = f"tor: failed: {_text(d.get('reason'))}; starting again in {d.get('retry_in')} s"
    elif kind in ("daemon.unlocked", "daemon.locked"):
        what = f"daemon: {kind.split('.')[1]}"
    elif kind == "profile.passphrase_changed":
        what = "profile: passphrase " + ("changed" if d.get("has_passphrase") else "removed")
    elif kind == "address.rotated":
        what = "profile: contact address replaced"
    elif kind == "backup.progress":
        what = f"backup {d.get('operation')}: {d.get('stage')}"
    elif kind == "backup.imported":
        what = f"backup restored: {d.get('contacts')} contacts, {d.get('messages')} messages"
    else:
        what = f"{_text(kind)} {_text(json.dumps(d, sort_keys=True))}"
    # Every value above is the daemon's, but some were chosen by a peer: the last guard
    # shows any control left (newlines and tabs stay: message lines are indented above).
    return safe_text.lines(f"{when(ev.get('time_ms'))}  {what}")


def follow(
    connect: Callable[[], Client],
    params: dict[str, Any],
    since: int | None,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Subscribe and hand every event to ``emit`` until interrupted, reconnecting when the
    daemon goes away. The first subscription's errors are the caller's (the daemon is not
    running: exit 3); later ones are waited out, with one line on stderr each way."""
    last = since
    first = True
    delay = FIRST_DELAY
    said_locked = False
    while True:
        try:
            c = connect()
        except Exception:
            if first:
                raise
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
            continue
        with c:
            try:
                sub = dict(params)
                if last is not None:
                    sub["since"] = last
                res = c.call("events.subscribe", sub)
            except (Locked, ConnectionError, OSError, ValueError) as exc:
                if first:
                    raise
                if isinstance(exc, Locked) and not said_locked:
                    _note("the daemon is back but locked; waiting for: aegis unlock")
                    said_locked = True
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            if last is None:
                last = int(res["last_seq"])
            if not first:
                _note(f"the daemon is back; continuing after event {last}")
            first, delay, said_locked = False, FIRST_DELAY, False
            sub_id = res.get("subscription")
            try:
                for note in c.notifications():
                    ev = note.get("params")
                    if note.get("method") != "event" or not isinstance(ev, dict):
                        continue
                    if ev.get("subscription") not in (None, sub_id):
                        continue
                    if ev.get("live") is True:  # never stored (contact.typing): not counted
                        emit(ev)
                        continue
                    seq = ev.get("seq")
                    if isinstance(seq, int) and seq <= last:
                        continue  # already printed before the reconnect: never twice
                    emit(ev)
                    if isinstance(seq, int):
                        last = seq
            except (ConnectionError, OSError, ValueError):
                pass
        _note("lost the connection to the daemon; waiting for it to come back (Ctrl-C stops)")


def _note(text: str) -> None:
    click.echo(f"aegis: {text}", err=True)
    sys.stderr.flush()
