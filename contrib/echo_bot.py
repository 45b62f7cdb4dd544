#!/usr/bin/env python3
"""An AegisLink bot that answers every message: "echo: " followed by the text.

It runs on top of a daemon (one profile per bot), through the client library, and imports no
cryptography: the daemon holds the keys and does the work.

    aegis init --home ~/echo-bot --no-passphrase --relay wss://relay.example/v1/ws
    aegis daemon --home ~/echo-bot --detach
    .venv/bin/python contrib/echo_bot.py --home ~/echo-bot --accept-requests

With --accept-requests it also accepts every request that arrives through its contact address
(``aegis address --home ~/echo-bot`` prints that address). In a group it answers in the group,
to every member; it accepts group invitations only with --accept-groups (by default they wait
for the operator: ``aegis group invitations``, ``aegis group accept``). It never answers its
own messages, nor a group message that is itself an answer (one starting with the prefix): two
bots in one group would otherwise echo each other for ever. A contact's reply is answered as a
reply quoting it, and a contact's reaction to a message is mirrored: the bot sets the same
reaction on that message (and removes it when the contact does). It needs only the standard library
and ``aegis_client``, which it takes from the clone it lives in when that is not installed (so a
plain ``python3 contrib/echo_bot.py`` works from a clone too). It follows the daemon across
restarts (the client library resubscribes from the last event it handled); with --state FILE
it also remembers that event across its own restarts, so no message is answered twice or
missed. Its log lines name no contact and quote no text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

try:
    import aegis_client  # noqa: F401
except ModuleNotFoundError:  # run from a clone without the venv: aegis_client is pure stdlib
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aegis_client import AegisClientError, Client, DaemonNotRunning, Event, safe_text

PREFIX = "echo: "
MAX_TEXT = 65536


def log(message: str) -> None:
    """One line on stderr. The bot's lines quote nothing a contact sent, but an error's text
    may carry what someone else chose: no control reaches the terminal or log viewer."""
    print(f"echo-bot: {safe_text.one_line(message)}", file=sys.stderr, flush=True)


def reply_to(text: str, prefix: str = PREFIX) -> str:
    """The answer to ``text``, cut (on a character boundary) to what messages.send accepts."""
    out = prefix + text
    raw = out.encode()
    if len(raw) > MAX_TEXT:
        out = raw[:MAX_TEXT].decode(errors="ignore")
    return out


def load_state(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def save_state(path: Path | None, seq: int) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{seq}\n")
    os.replace(tmp, path)


async def own_key(client: Client, group: int) -> str | None:
    """The bot's identity key as the group's member list shows it (hex)."""
    members = (await client.group(group))["members"]
    return next((m["key"] for m in members if m["you"]), None)


async def answer_group(client: Client, ev: Event, prefix: str) -> None:
    group, sender, text = ev.data.get("group"), ev.data.get("from"), ev.data.get("text")
    if not isinstance(group, int) or isinstance(group, bool) or not isinstance(text, str):
        return
    if text.startswith(prefix):  # an answer (another bot's): answering it would never end
        return
    try:
        if sender == await own_key(client, group):  # never our own
            return
        await client.send_to_group(group, reply_to(text, prefix))
        await client.mark_group_read(group, str(ev.data.get("message_id")))  # as for texts
    except AegisClientError as exc:
        log(f"could not answer a group message: {type(exc).__name__}")


async def handle(
    client: Client, ev: Event, prefix: str, accept_requests: bool, accept_groups: bool = False
) -> None:
    if ev.type == "message.received":
        contact, text = ev.data.get("contact"), ev.data.get("text")
        if not isinstance(contact, str) or not isinstance(text, str):
            return
        message_id, quoted = str(ev.data.get("message_id")), ev.data.get("reply_to")
        try:
            if isinstance(quoted, str):  # a reply: the answer quotes it, as a person would
                await client.reply(contact, message_id, reply_to(text, prefix))
            else:
                await client.send(contact, reply_to(text, prefix))
            await client.mark_read(contact, [message_id])
        except AegisClientError as exc:
            log(f"could not answer a message: {type(exc).__name__}")
    elif ev.type == "message.reaction":
        target, emoji = ev.data.get("message_id"), ev.data.get("emoji")
        if not isinstance(target, str) or not (emoji is None or isinstance(emoji, str)):
            return
        try:  # the same reaction beside the contact's (only a contact's raise this event)
            await client.react(target, emoji or "")
        except AegisClientError as exc:
            log(f"could not mirror a reaction: {type(exc).__name__}")
    elif ev.type == "group.message":
        await answer_group(client, ev, prefix)
    elif ev.type == "group.invitation":
        invitation = ev.data.get("invitation")
        if not isinstance(invitation, int) or isinstance(invitation, bool):
            return
        if not accept_groups:
            log("a group invitation waits for the operator (aegis group invitations)")
            return
        try:
            await client.accept_group(invitation)
            log("accepted a group invitation")
        except AegisClientError as exc:
            log(f"could not accept a group invitation: {type(exc).__name__}")
    elif ev.type == "contact.request" and accept_requests:
        request = ev.data.get("request")
        if isinstance(request, int) and not ev.data.get("known"):
            try:
                await client.accept(request)
                log("accepted a contact request")
            except AegisClientError as exc:
                log(f"could not accept a request: {type(exc).__name__}")


async def run(
    home: str | None,
    prefix: str,
    accept_requests: bool,
    state: Path | None,
    accept_groups: bool = False,
) -> int:
    try:
        client = await Client.connect(home)
    except DaemonNotRunning as exc:
        log(f"error: {exc}; start it with: aegis daemon --detach")
        return 3
    types = ["message.received", "message.reaction", "contact.request", "group.message",
             "group.invitation"]
    stream = client.events(types=types, since=load_state(state))
    try:
        await stream.start()  # subscribed: a message sent after the next line is answered
        log("listening")
        async for ev in stream:
            await handle(client, ev, prefix, accept_requests, accept_groups)
            save_state(state, ev.seq)
        return 0
    finally:
        await stream.aclose()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="echo_bot", description=__doc__.split("\n")[0])
    p.add_argument("--home", help="the bot's profile (default: AEGIS_HOME, else XDG dirs)")
    p.add_argument("--prefix", default=PREFIX, help=f"put before each answer ({PREFIX!r})")
    p.add_argument("--accept-requests", action="store_true", help="accept contact requests")
    p.add_argument(
        "--accept-groups",
        action="store_true",
        help="accept group invitations (by default they wait for the operator)",
    )
    p.add_argument("--state", type=Path, help="remember the last handled event in FILE")
    args = p.parse_args(argv)

    async def main_task() -> int:
        task = asyncio.ensure_future(
            run(args.home, args.prefix, args.accept_requests, args.state, args.accept_groups)
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return 0

    return asyncio.run(main_task())


if __name__ == "__main__":
    sys.exit(main())
