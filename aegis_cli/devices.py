"""``aegis device link|list|remove`` and the new device's side of ``aegis init --link``
(docs/api.md, "Devices"). Thin: JSON-RPC only; the link runs in the daemon, this follows it
with ``devices.status``: the new device shows the code, the existing device's user types it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from aegisd.paths import DB_NAME, KEYRING_NAME, LOCK_NAME, LOG_NAME, PID_NAME, SOCKET_NAME

from .errors import Fail

if TYPE_CHECKING:
    from .main import Ctx

POLL = 0.3
ENDED = ("done", "declined", "expired", "failed")
INSTALLED = ("installing", "listing", "done")  # the new device's states once E's final came
GIVES_KEY = (
    "Typing the code gives the new device this profile's identity key: it can then read and "
    "write as you. Type it only if you started this link on a device of your own."
)


def read_link(value: str | None) -> str:
    """LINK from standard input (``-``, or none given and no terminal) or a prompt that does
    not echo: a link in argv would be visible to every user of the machine (ps)."""
    if value is not None and value != "-":
        return value
    if value == "-" or not sys.stdin.isatty():
        text = sys.stdin.readline().strip()
    else:
        text = str(click.prompt("Device link", hide_input=True, err=True)).strip()
    if not text:
        raise Fail("no device link given")
    return text


def _status(ctx: Ctx) -> dict[str, Any]:
    link: dict[str, Any] | None = ctx.call("devices.status")["link"]
    if link is None:
        raise Fail("no device link is under way")
    return link


def _wait(ctx: Ctx, states: tuple[str, ...]) -> dict[str, Any]:
    while True:
        link = _status(ctx)
        if link["state"] in states or link["state"] in ENDED:
            return link
        time.sleep(POLL)


def follow(ctx: Ctx, yes: bool) -> dict[str, Any]:
    """Wait for the code, ask the user to compare it, confirm, and wait for the end. An
    interrupt ends the link in the daemon too (it would otherwise run on unattended)."""
    try:
        return _follow(ctx, yes)
    except (KeyboardInterrupt, click.Abort):
        with contextlib.suppress(Exception):  # ended meanwhile: nothing to cancel
            ctx.call("devices.cancel")
        raise


def _follow(ctx: Ctx, yes: bool) -> dict[str, Any]:
    link = _wait(ctx, ("code",))
    if link["state"] == "code" and link["role"] == "offer":
        # The existing device sends the identity key on its user's word alone: that word is
        # the code the new device shows, typed (no --yes: docs/devices.md §4.5).
        click.echo(GIVES_KEY, err=True)
        typed = str(click.prompt("Code the new device shows (empty: refuse)", default="",
                                 show_default=False, err=True)).strip()  # fmt: skip
        if not typed:
            ctx.call("devices.confirm", {"accept": False})
            raise Fail("refused: the link was ended, nothing was sent")
        link = ctx.call("devices.confirm", {"code": typed})
        if link["state"] == "declined":
            raise Fail("that is not the code the new device shows: the link was ended, "
                       "nothing was sent")  # fmt: skip
        link = _wait(ctx, ())
    elif link["state"] == "code":
        code = str(link["code"])
        click.echo(f"Confirmation code: {code}  (type it on the existing device)", err=True)
        ok = yes or click.confirm(
            "Take the profile from the existing device once its user typed this code?",
            default=True, err=True,
        )  # fmt: skip
        ctx.call("devices.confirm", {"accept": ok})
        if not ok:
            raise Fail("declined: the link was ended, nothing was installed")
        link = _wait(ctx, ())
    if link["state"] != "done":
        raise Fail(f"the link did not complete ({link['state']}"
                   + (f": {link['reason']}" if link.get("reason") else "") + ")")  # fmt: skip
    if link.get("reason"):  # done, with a warning (installed; what followed failed)
        click.echo(f"NOTE: {link['reason']}", err=True)
    return link


def join_new_device(
    ctx: Ctx, link_text: str, passphrase: str | None, yes: bool,
    started: Callable[[], bool], before: set[str] | None,
) -> None:  # fmt: skip
    """``aegis init --link``: start the new profile's daemon, join, confirm, wait. A failure
    before the profile was installed stops that daemon and deletes what this command made in
    the home (``before``: the names it held before, None if it made the home): the throwaway
    profile would only refuse the next try (not fresh, or "a profile already exists"). A
    profile that is, or may be, installed is never deleted (docs/devices.md §4.5)."""
    procs: list[subprocess.Popen[bytes]] = []  # filled once started: _undo waits for it
    asked: list[bool] = []  # set once devices.join was asked: from then an install may commit
    try:
        _join_new_device(ctx, link_text, passphrase, yes, started, procs, asked)
    except BaseException:
        after_failure(ctx, procs[0] if procs else None, started, before, bool(asked))
        raise


def after_failure(
    ctx: Ctx, proc: subprocess.Popen[bytes] | None, started: Callable[[], bool],
    before: set[str] | None, asked: bool,
) -> None:  # fmt: skip
    """Undo only what surely holds no installed profile: the join never asked, or the daemon
    says so (its link state and its store's device list). A daemon that does not answer (it
    died during the install, say) may have committed it: the profile is kept, and said."""
    state = _install_state(ctx) if asked else "not installed"
    if state == "not installed":
        _undo(ctx, proc, started, before)
        return
    home = ctx.paths.home
    if state == "installed":
        click.echo(f"The profile is installed in {home} (what followed failed): see "
                   f"aegis device list{ctx.paths.home_option()}.", err=True)  # fmt: skip
        return
    click.echo(
        f"The daemon of {home} stopped during the link: the profile may have been installed, "
        f"so it was kept. Start it (aegis start{ctx.paths.home_option()}) and run aegis "
        "device list: version 0 means nothing was linked (remove the profile, then link "
        "again); otherwise this device holds the profile.", err=True,
    )  # fmt: skip


def _install_state(ctx: Ctx) -> str:
    """One of "installed", "not installed", "unknown" (no daemon answers, or locked). The
    install writes the device list in its transaction, and only a fresh profile (no list)
    can join: a list held means installed, whatever the link's state (a restart forgets it)."""
    try:
        link = ctx.call("devices.status")["link"]
        listed = ctx.call("devices.list")
    except Exception:
        return "unknown"
    if listed["version"] or (link is not None and link["state"] in INSTALLED):
        return "installed"
    return "not installed"


def _undo(
    ctx: Ctx, proc: subprocess.Popen[bytes] | None, started: Callable[[], bool],
    before: set[str] | None,
) -> None:  # fmt: skip
    with contextlib.suppress(Exception):
        ctx.call("daemon.stop")
    if proc is not None:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    elif started():
        click.echo(f"The daemon of {ctx.paths.home} still runs: aegis stop, then remove it.",
                   err=True)  # fmt: skip
        return
    home = ctx.paths.home
    if before is None:
        shutil.rmtree(home, ignore_errors=True)
    else:
        # Only the names a profile uses (aegisd/paths.py, the store's journal, the daemon's
        # folders): anything else that appeared meanwhile belongs to another program.
        for name in _profile_names(home) - before:
            path = home / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
    click.echo(f"Nothing was linked: the profile this command created in {home} was removed.",
               err=True)  # fmt: skip


#: What init and the daemon create in a home besides aegisd/paths.py's files: the database's
#: journal files, the attachments and Tor folders (services/attachments.py, connectivity.py).
_PROFILE_EXTRA = ("aegis.db-wal", "aegis.db-shm", "aegis.db-journal", "attachments", "tor")


def _profile_names(home: Path) -> set[str]:
    names = {DB_NAME, KEYRING_NAME, LOCK_NAME, PID_NAME, LOG_NAME, SOCKET_NAME, *_PROFILE_EXTRA}
    with contextlib.suppress(OSError):  # the keyring's atomic write (store/keyring.py)
        names |= {n for n in os.listdir(home)
                  if n.startswith(f".{KEYRING_NAME}.") and n.endswith(".tmp")}  # fmt: skip
    return {n for n in names if os.path.lexists(home / n)}


def _join_new_device(
    ctx: Ctx, link_text: str, passphrase: str | None, yes: bool,
    started: Callable[[], bool], procs: list[subprocess.Popen[bytes]], asked: list[bool],
) -> None:  # fmt: skip
    argv = ctx.aegisd_argv("run")
    fd = os.open(ctx.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    procs.append(proc)
    deadline = time.monotonic() + 30
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not started():
        raise Fail(f"aegisd did not start; see {ctx.paths.log}")
    if passphrase is not None:
        ctx.call("unlock", {"passphrase": passphrase})
    deadline = time.monotonic() + 60
    while not ctx.call("status")["relay"]["connected"]:
        if time.monotonic() > deadline:
            raise Fail("the relay could not be reached: see aegis status")
        time.sleep(POLL)
    asked.append(True)  # before the call: its answer may be lost after the daemon took it
    ctx.call("devices.join", {"link": link_text})
    click.echo("Joining: the existing device shows a code once this request reaches it.",
               err=True)  # fmt: skip
    done = follow(ctx, yes)
    listed = ctx.call("devices.list")
    ctx.out({"link": done, "devices": listed},
            f"Linked: this device is one of {len(listed['devices'])} devices of the profile. "
            f"The daemon runs (pid {proc.pid}).")  # fmt: skip


def register(main: ModuleType) -> None:
    """Add the commands to the CLI (given the main module, as aegis_cli/calls.py explains)."""
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common

    @cli.group(short_help="Link another device to this profile; list or remove devices.")
    def device() -> None:
        """Several devices per person (docs/devices.md). Contacts do not yet reach a linked
        device: see README, "Several devices"."""

    @device.command("link", short_help="Link a new device (prints a one-time link).")
    @common
    @click.option("--qr", is_flag=True, help="Also print the link as a QR code.")
    @click.option(
        "--expires",
        type=click.IntRange(10, 600),
        default=600,
        show_default=True,
        metavar="SECONDS",
        help="The link is void after this many seconds.",
    )
    @click.option("--cancel", is_flag=True, help="End the link under way instead.")
    def link(ctx: Ctx, qr: bool, expires: int, cancel: bool) -> None:
        """Print a one-time link for `aegis init --link -` on the new machine, wait for it,
        and send the profile once you typed the code the new device shows (there is no
        --yes: typing that code is what gives the new device the identity key)."""
        if cancel:
            ctx.out(ctx.call("devices.cancel"), "The device link was ended.")
            return
        result = ctx.call("devices.link", {"expires_in": expires})
        text = str(result["link"])
        if qr:
            click.echo(main._qr_text(text), nl=False, err=ctx.as_json)
        click.echo(text, err=ctx.as_json)
        click.echo("On the new machine run: aegis init --link - --relay URL and paste the link "
                   "(it is a secret; it works once)", err=True)  # fmt: skip
        sys.stderr.flush()
        done = follow(ctx, False)
        ctx.out(done, "The new device is linked.")

    @device.command("join", short_help="Join a profile as a new device (a fresh profile).")
    @common
    @click.argument("link_text", metavar="[LINK]", required=False)
    @click.option("--yes", is_flag=True, help="Take the profile without asking.")
    def join(ctx: Ctx, link_text: str | None, yes: bool) -> None:
        """What `aegis init --link` does once the profile exists and its daemon runs: join
        the profile the LINK came from, show the code to type on the existing device, and
        install the profile. Only into a fresh profile (no contacts, messages or groups).
        LINK `-` or none: read from standard input (or asked without echo), out of argv."""
        ctx.call("devices.join", {"link": read_link(link_text)})
        click.echo("Joining: the existing device shows a code once this request reaches it.",
                   err=True)  # fmt: skip
        done = follow(ctx, yes)
        ctx.out(done, "Linked: this device holds the profile now.")

    @device.command("list", short_help="The profile's devices (this one marked *).")
    @common
    def list_(ctx: Ctx) -> None:
        """The signed device list; * marks this device."""
        result = ctx.call("devices.list")
        lines = [f"device list version {result['version']}"]
        for d in result["devices"]:
            added = main._when(d["added_at"] * 1000) if d["added_at"] else "-"
            line = f"{'*' if d['this_device'] else ' '} {d['id']}  added {added}"
            if not d["this_device"]:  # what a removal from here deletes at the relay
                line += f"  {d.get('delete_keys', 0)} mailboxes deletable from here"
            lines.append(line)
        if result.get("unconfirmed"):
            lines.append("The device in use never confirmed that it lists this device: check "
                         "aegis device list there; once this device is in it, run aegis "
                         "device confirm-listed.")  # fmt: skip
        ctx.out(result, "\n".join(lines))

    @device.command("confirm-listed", short_help="Dismiss the `unconfirmed` warning.")
    @common
    def confirm_listed(ctx: Ctx) -> None:
        """You saw this device in `aegis device list` on the device in use: clear the warning
        that it never confirmed listing this device."""
        result = ctx.call("devices.confirm_listed")
        ctx.out(result, "This device is no longer marked unconfirmed.")

    @device.command("remove", short_help="Remove a device from the list.")
    @common
    @click.argument("device_id", metavar="ID")
    def remove(ctx: Ctx, device_id: str) -> None:
        """Sign a device list without ID and delete at the relay the removed device's
        mailboxes this device holds delete keys for (its device mailbox, if it was linked
        from here or linked this one); the relay away: on the next connection. Protects
        against a lost device, not a compromised one (it keeps the identity key: the remedy
        is a new profile). The new list goes to your contacts, who then stop sending to it."""
        result = ctx.call("devices.remove", {"id": device_id})
        queued = result["mailboxes_queued"]
        refused = result.get("mailboxes_refused", 0)
        ctx.out(result, f"Removed; the list is now version {result['version']} with "
                        f"{result['devices']} device(s); {result['mailboxes_deleted']} of its "
                        "mailboxes deleted at the relay"
                        + (f", {queued} on the next connection" if queued else "")
                        + (f", {refused} kept for later: their relay's URL is refused by this"
                           " profile's relay settings" if refused else "")
                        + f"; {result['contacts_told']} contact(s) told.")  # fmt: skip
