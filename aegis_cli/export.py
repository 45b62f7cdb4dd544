"""``aegis export``: one conversation, a group's, or all of them, to a file the user reads
(text) or a program reads (JSON: the message objects `messages.history` and `group.history`
return, whatever fields they carry).

The file is plaintext: its mode is 0600 and it is created anew (O_EXCL, no symlink
followed); an existing file is replaced only with --force, through a new 0600 file renamed
over it (unnamed while it is written where the file system has O_TMPFILE and /proc is
mounted to name it, so a kill leaves no hidden copy; else a hidden temporary file, removed on
any failure), then the directory synced. In the text form, what a peer chose goes through
aegis_client.safe_text as on the terminal: no escape sequence, carriage return or bidi
override reaches the file as it is, and a message's later lines are indented, so none passes
for another message."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from aegis_client.safe_text import body, one_line

from .actions import marks as action_marks
from .actions import quote

if TYPE_CHECKING:
    from .main import Ctx

EXPORT_VERSION = 1
PAGE = 500
#: Where an unnamed (O_TMPFILE) file is given a name from (_name).
PROC_FDS = "/proc/self/fd"

#: The fields every message object has (docs/api.md), rendered by the text form's own rules;
#: any other field (added by a later feature: an edit, reactions, a reply) is rendered
#: generically after the text.
_BASE = frozenset({"message_id", "seq", "direction", "text", "status", "sent_at",
                   "created_at", "status_at", "from", "from_contact", "read", "delivery",
                   "attachment_id"})  # fmt: skip


#: Fields with a rendering of their own (aegis_cli/actions.py, as `aegis messages` shows them).
_SHOWN = frozenset({"reply_to", "edited_at", "edits", "reactions", "deleted"})


def _pages(ctx: Ctx, method: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every message of one conversation, oldest first."""
    out: list[dict[str, Any]] = []
    before = None
    with ctx.client() as c:
        while True:
            r = c.call(method, {**params, "limit": PAGE, "before": before})
            out[:0] = r["messages"]
            before = r["next_before"]
            if before is None:
                return out


def collect(ctx: Ctx, name: str | None, group: int | None, everything: bool
            ) -> list[dict[str, Any]]:  # fmt: skip
    convs: list[dict[str, Any]] = []
    contacts = [name] if name is not None else []
    groups: list[tuple[int, str]] = []
    if everything:
        contacts = [str(c["name"]) for c in ctx.call("contacts.list")["contacts"]]
    if everything or group is not None:
        groups = [(int(g["group"]), str(g["name"])) for g in ctx.call("group.list")["groups"]
                  if everything or g["group"] == group]  # fmt: skip
    for contact in contacts:
        convs.append({"kind": "contact", "contact": contact,
                      "messages": _pages(ctx, "messages.history", {"contact": contact})})
    for ref, gname in groups:
        convs.append({"kind": "group", "group": ref, "name": gname,
                      "messages": _pages(ctx, "group.history", {"group": ref})})
    return convs


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(ms / 1000))


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def _extra(value: Any, depth: int = 0) -> str:
    """A field's value in words: a mapping as "key: value, ...", a list comma-separated."""
    if isinstance(value, dict):
        inner = ", ".join(f"{k}: {_extra(v, depth + 1)}" for k, v in value.items())
        return f"({inner})" if depth else inner
    if isinstance(value, list):
        inner = ", ".join(_extra(v, depth + 1) for v in value)
        return f"({inner})" if depth else inner
    return str(value)


def message_text(m: dict[str, Any], peer: str | None) -> str:
    """One message of the text form (``peer``: the contact's name, for a 1:1 message)."""
    when = m.get("sent_at") or m["created_at"]
    if m["direction"] == "out":
        who = "me"
    elif peer is not None:
        who = one_line(peer, ascii_only=False)
    else:
        who = one_line(m.get("from_contact") or str(m.get("from", ""))[:12], ascii_only=False)
    marks = []
    if m.get("deleted"):
        marks.append("(deleted)")
    for key in sorted(set(m) - _BASE - _SHOWN):
        if m[key] not in (None, False, "", [], {}):
            marks.append(f"[{key}: {one_line(_extra(m[key]), 200, ascii_only=False)}]")
    status = f"  [{m['status']}]" if m["direction"] == "out" and "status" in m else ""
    tail = (" " + " ".join(marks)) if marks else ""
    # A reply's quote, the edit mark and the reactions as `aegis messages` shows them.
    text = quote(m) + body(m["text"], ascii_only=False)
    return f"{_clock(when)}  {who}: {text}{action_marks(m, _clock)}{tail}{status}"


def render_text(convs: list[dict[str, Any]], now_ms: int) -> str:
    out = [f"AegisLink export, {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now_ms / 1000))}"
           " (local times)"]  # fmt: skip
    for conv in convs:
        if conv["kind"] == "contact":
            peer = conv["contact"]
            title = f"Conversation with {one_line(peer, ascii_only=False)}"
        else:
            title, peer = f"Group #{conv['group']} {one_line(conv['name'], ascii_only=False)}", None
        out += ["", f"== {title} =="]
        day = None
        for m in conv["messages"]:
            d = _day(m.get("sent_at") or m["created_at"])
            if d != day:
                out += ["", f"--- {d} ---"]
                day = d
            out.append(message_text(m, peer))
        if not conv["messages"]:
            out.append("(no messages)")
    return "\n".join(out) + "\n"


def write_private(path: Path, data: bytes, force: bool, fail: type[Exception]) -> None:
    """Write ``data`` to a new file of mode 0600; with ``force``, to a new file renamed over
    FILE, whatever is there by then (its old mode and any link it was do not carry over)."""
    if not force:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise fail(f"{one_line(str(path))} exists: add --force to replace it") from None
        except OSError as exc:
            raise fail(f"cannot create {one_line(str(path))}: {exc.strerror}") from None
        try:
            _write(fd, data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        _sync_dir(path.parent)
        return
    fd, temp = _temp_file(path, fail)
    try:
        _write(fd, data)
        if temp is None:  # unnamed until now: a kill before here leaves nothing behind
            named = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                _name(fd, named)
                temp = named
            except OSError:
                # /proc is there but linkat refused (a sandbox, a /proc of another kind):
                # the unnamed file goes with its fd; the data goes to a named one instead.
                os.close(fd)
                fd = -1
                fd, temp = _named_temp(path, fail)
                _write(fd, data)
        try:
            os.replace(temp, path)
        except IsADirectoryError:
            raise fail(f"{one_line(str(path))} is a directory") from None
        except OSError as exc:
            raise fail(f"cannot replace {one_line(str(path))}: {exc.strerror}") from None
        temp = None
        _sync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        if temp is not None:
            temp.unlink(missing_ok=True)


def _temp_file(path: Path, fail: type[Exception]) -> tuple[int, Path | None]:
    """A new 0600 file in FILE's directory: unnamed (O_TMPFILE, Linux) where the file system
    allows it, so the plaintext has a name only for the instant before the rename; else a
    hidden name, removed on any failure (a kill leaves it)."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    # Naming it takes /proc/self/fd (_name); without /proc (a chroot, a container, a sandbox)
    # the named temp file is the only way.
    if tmpfile and os.path.isdir(PROC_FDS):
        try:
            return os.open(path.parent, os.O_WRONLY | tmpfile, 0o600), None
        except OSError:
            pass  # a file system without it: a named temp file
    return _named_temp(path, fail)


def _named_temp(path: Path, fail: type[Exception]) -> tuple[int, Path]:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(temp, flags, 0o600), temp
    except OSError as exc:
        raise fail(f"cannot create a file beside {one_line(str(path))}: {exc.strerror}") from None


def _name(fd: int, temp: Path) -> None:
    """Give the unnamed file ``fd`` the name ``temp``: linkat with AT_SYMLINK_FOLLOW on its
    /proc link (os.link uses plain link(2), which would link the /proc link itself, unless a
    directory fd is given). linkat's other way, AT_EMPTY_PATH, needs CAP_DAC_READ_SEARCH."""
    directory = os.open(temp.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.link(f"{PROC_FDS}/{fd}", temp.name, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _write(fd: int, data: bytes) -> None:
    os.fchmod(fd, 0o600)  # whatever the umask
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _sync_dir(directory: Path) -> None:
    """The new name on disk too, not only the data (a crash would otherwise lose the rename)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def register(main: ModuleType) -> None:
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common
    Fail: type[Exception] = main.Fail

    @cli.command("export", short_help="Write conversations to a text or JSON file (0600).")
    @common
    @click.argument("name", required=False)
    @click.option("--group", metavar="GROUP", help="Export this group's conversation.")
    @click.option("--all", "everything", is_flag=True, help="Export every conversation.")
    @click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                  show_default=True, help="Readable text, or JSON (the API's objects).")
    @click.option("--output", metavar="FILE", required=True, type=click.Path(path_type=str),
                  help="The file to write (created with mode 0600).")
    @click.option("--force", is_flag=True, help="Replace FILE if it exists.")
    def export(ctx: Ctx, name: str | None, group: str | None, everything: bool, fmt: str,
               output: str, force: bool) -> None:  # fmt: skip
        """Write the conversation with NAME, a group's (--group) or all of them (--all) to
        FILE as readable text or JSON. The file is plaintext (mode 0600): keep it safe.

        An existing FILE is refused unless --force is given."""
        if sum((name is not None, group is not None, everything)) != 1:
            raise click.UsageError("give NAME, --group GROUP or --all (one of them)")
        path = Path(os.path.abspath(os.path.expanduser(output)))
        if not force and (path.exists() or path.is_symlink()):
            raise Fail(f"{one_line(str(path))} exists: add --force to replace it")
        ref = None
        if group is not None:
            from .groups import resolve_group

            ref = resolve_group(ctx, group, Fail)
        if name is not None:
            ctx.call("messages.history", {"contact": name, "limit": 1})  # not_found first
        convs = collect(ctx, name, ref, everything)
        now = time.time_ns() // 1_000_000
        if fmt == "json":
            doc = {"aegislink_export": EXPORT_VERSION, "exported_at": now,
                   "conversations": convs}  # fmt: skip
            data = (json.dumps(doc, indent=1)  # ASCII: no raw control or C1 byte in the file
                     + "\n").encode()
        else:
            data = render_text(convs, now).encode()
        write_private(path, data, force, Fail)
        n = sum(len(c["messages"]) for c in convs)
        result = {"path": str(path), "conversations": len(convs), "messages": n,
                  "format": fmt}  # fmt: skip
        ctx.out(result, f"wrote {n} messages of {len(convs)} conversations to "
                        f"{one_line(str(path))}")  # fmt: skip
