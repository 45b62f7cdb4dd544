"""The few commands of Tor's control protocol the daemon needs (control-spec.txt), over the
managed Tor's Unix control socket.

Hand-written rather than stem: stem is synchronous (a reader thread per controller), its last
release is from 2023, and the daemon needs six commands (PROTOCOLINFO, AUTHCHALLENGE,
AUTHENTICATE, TAKEOWNERSHIP, SETEVENTS, GETINFO) and one event (STATUS_CLIENT) on its own
event loop. The parsers are pure functions, fuzzed in tests/unit/test_torcontrol.py.

Authentication is SAFECOOKIE: the cookie never crosses the socket, and the server proves it
knows the cookie too (compared in constant time), so a process that took the socket's place
learns nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aegisd.aio import cancel_and_wait

log = logging.getLogger("aegisd.tor")

#: A reply line longer than this is refused (Tor's own lines are far shorter).
MAX_LINE = 64 * 1024
#: A reply with more lines, or more bytes, than this is refused.
MAX_REPLY_LINES = 4096
MAX_REPLY_BYTES = 1 << 20
COMMAND_TIMEOUT = 30.0

_SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
_CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"
_COOKIE_LEN = 32
_KEY_RE = re.compile(r"[A-Za-z0-9_/.\-]+")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


class ControlError(Exception):
    """The control connection failed or Tor refused a command. The message holds no secret."""


@dataclass(frozen=True)
class Reply:
    """One reply: its status code and its lines (data lines of '+' entries appended after
    their key line, joined by newlines)."""

    code: int
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


@dataclass(frozen=True)
class Bootstrap:
    """Tor's bootstrap status (control-spec "Bootstrap events")."""

    progress: int
    tag: str
    summary: str
    warning: str | None = None

    @property
    def done(self) -> bool:
        return self.progress >= 100


def unquote(s: str) -> tuple[str, str]:
    """A QuotedString at the start of ``s`` (which starts with '"'): its value and the rest."""
    if not s.startswith('"'):
        raise ControlError("malformed control reply")
    out: list[str] = []
    i = 1
    while i < len(s):
        ch = s[i]
        if ch == '"':
            return "".join(out), s[i + 1 :]
        if ch == "\\":
            if i + 1 >= len(s):
                break
            nxt = s[i + 1]
            if nxt in "01234567":  # octal escape, up to three digits
                j = i + 1
                while j < len(s) and j < i + 4 and s[j] in "01234567":
                    j += 1
                out.append(chr(int(s[i + 1 : j], 8) & 0xFF))
                i = j
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    raise ControlError("malformed control reply")


def parse_kv(s: str) -> dict[str, str]:
    """``KEY=VALUE KEY="quoted value" FLAG`` into a dict (a bare FLAG maps to '')."""
    out: dict[str, str] = {}
    rest = s.strip(" ")
    while rest:
        m = _KEY_RE.match(rest)
        if m is None:
            raise ControlError("malformed control reply")
        key = m.group(0)
        rest = rest[m.end() :]
        value = ""
        if rest.startswith("="):
            rest = rest[1:]
            if rest.startswith('"'):
                value, rest = unquote(rest)
            else:
                end = rest.find(" ")
                value, rest = (rest, "") if end < 0 else (rest[:end], rest[end:])
        if rest and not rest.startswith(" "):
            raise ControlError("malformed control reply")
        out[key] = value
        rest = rest.lstrip(" ")
    return out


def parse_bootstrap(text: str) -> Bootstrap:
    """``NOTICE BOOTSTRAP PROGRESS=45 TAG=loading_descriptors SUMMARY="..."`` (the value of
    GETINFO status/bootstrap-phase, or a STATUS_CLIENT event without its '650 STATUS_CLIENT')."""
    parts = text.split(" ", 2)
    if len(parts) < 3 or parts[1] != "BOOTSTRAP" or parts[0] not in ("NOTICE", "WARN", "ERR"):
        raise ControlError("not a bootstrap status")
    kv = parse_kv(parts[2])
    try:
        progress = int(kv["PROGRESS"])
    except (KeyError, ValueError):
        raise ControlError("malformed bootstrap status") from None
    if not 0 <= progress <= 100:
        raise ControlError("malformed bootstrap status")
    warning = kv.get("WARNING") if parts[0] != "NOTICE" else None
    return Bootstrap(progress, kv.get("TAG", "")[:64], kv.get("SUMMARY", "")[:200], warning)


def parse_reply_line(line: str) -> tuple[int, str, str]:
    """A reply line: its code, its separator ('-', '+' or ' ') and its text."""
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in "-+ ":
        raise ControlError("malformed control reply")
    return int(line[:3]), line[3], line[4:]


def safecookie_hashes(
    cookie: bytes, client_nonce: bytes, server_nonce: bytes
) -> tuple[bytes, bytes]:
    """(server hash expected from Tor, client hash to send), control-spec "AUTHCHALLENGE"."""
    msg = cookie + client_nonce + server_nonce
    return (
        hmac.new(_SERVER_KEY, msg, hashlib.sha256).digest(),
        hmac.new(_CLIENT_KEY, msg, hashlib.sha256).digest(),
    )


EventHandler = Callable[[str], None]


class TorControl:
    """One authenticated control connection. ``on_event`` receives each asynchronous event's
    text (after '650 '); a connection that breaks sets ``closed``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._replies: asyncio.Queue[Reply | ControlError] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self.on_event: EventHandler | None = None
        self.closed = asyncio.Event()
        self._task = asyncio.create_task(self._read_loop(), name="tor-control")

    @classmethod
    async def connect(cls, path: Path) -> TorControl:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
        except OSError as exc:
            raise ControlError(f"cannot reach Tor's control socket ({exc.strerror})") from None
        return cls(reader, writer)

    async def close(self) -> None:
        self.closed.set()
        self._writer.close()
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                code, lines = await self._read_reply()
                if code == 650:
                    if self.on_event is not None and lines:
                        try:
                            self.on_event(lines[0])
                        except Exception as exc:  # a bug in a handler: not the connection's
                            log.error("a Tor event handler failed: %s", type(exc).__name__)
                    continue
                self._replies.put_nowait(Reply(code, tuple(lines)))
        except ControlError as exc:
            self._replies.put_nowait(exc)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self._replies.put_nowait(ControlError("Tor closed the control connection"))
        finally:
            self.closed.set()

    async def _readline(self) -> str:
        raw = await self._reader.readuntil(b"\r\n")
        try:
            return raw[:-2].decode("utf-8")
        except UnicodeDecodeError:
            raise ControlError("malformed control reply") from None

    async def _read_reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        budget = [MAX_REPLY_LINES, MAX_REPLY_BYTES]

        async def line() -> str:
            text = await self._readline()
            budget[0] -= 1
            budget[1] -= len(text) + 2
            if budget[0] < 0 or budget[1] < 0:
                raise ControlError("control reply too long")
            return text

        while True:
            code, sep, text = parse_reply_line(await line())
            if sep == "+":  # data follows, up to a line holding only '.'
                data: list[str] = []
                while (d := await line()) != ".":
                    data.append(d[1:] if d.startswith("..") else d)
                text = text + "\n" + "\n".join(data)
            lines.append(text)
            if sep == " ":
                return code, lines

    async def command(self, line: str) -> Reply:
        """Send one command line (no CR or LF inside) and return Tor's reply."""
        if "\r" in line or "\n" in line:
            raise ValueError("a control command is one line")
        async with self._lock:
            if self.closed.is_set():
                raise ControlError("Tor closed the control connection")
            try:
                self._writer.write(line.encode() + b"\r\n")
                await self._writer.drain()
                reply = await asyncio.wait_for(self._replies.get(), COMMAND_TIMEOUT)
            except BaseException as exc:
                # A reply may still come and would be taken for the next command's: this
                # connection can no longer be trusted to pair them.
                self.closed.set()
                self._writer.close()
                if isinstance(exc, (TimeoutError, OSError)):
                    raise ControlError("Tor's control connection failed") from None
                raise
        if isinstance(reply, ControlError):
            raise reply
        return reply

    async def checked(self, line: str) -> Reply:
        reply = await self.command(line)
        if not reply.ok:
            verb = line.split(" ", 1)[0]
            raise ControlError(f"Tor refused {verb}: {reply.code} {reply.lines[-1][:200]}")
        return reply

    async def authenticate(self, cookie_path: Path | None = None) -> None:
        """SAFECOOKIE authentication with the cookie file Tor names (or ``cookie_path``)."""
        info = await self.checked("PROTOCOLINFO 1")
        methods: set[str] = set()
        cookie_file = str(cookie_path) if cookie_path is not None else None
        for line in info.lines:
            if line.startswith("AUTH "):
                kv = parse_kv(line[5:])
                methods = set(kv.get("METHODS", "").split(","))
                cookie_file = cookie_file or kv.get("COOKIEFILE")
        if "SAFECOOKIE" not in methods or not cookie_file:
            raise ControlError("Tor does not offer cookie authentication")
        try:
            cookie = Path(cookie_file).read_bytes()
        except OSError as exc:
            msg = f"cannot read Tor's authentication cookie ({exc.strerror})"
            raise ControlError(msg) from None
        if len(cookie) != _COOKIE_LEN:
            raise ControlError("Tor's authentication cookie has the wrong length")
        client_nonce = secrets.token_bytes(32)
        reply = await self.checked(f"AUTHCHALLENGE SAFECOOKIE {client_nonce.hex()}")
        line = reply.lines[0]
        if not line.startswith("AUTHCHALLENGE "):
            raise ControlError("malformed control reply")
        kv = parse_kv(line[len("AUTHCHALLENGE ") :])
        try:
            server_hash = bytes.fromhex(kv["SERVERHASH"])
            server_nonce = bytes.fromhex(kv["SERVERNONCE"])
        except (KeyError, ValueError):
            raise ControlError("malformed control reply") from None
        expected, client_hash = safecookie_hashes(cookie, client_nonce, server_nonce)
        if not hmac.compare_digest(expected, server_hash):
            raise ControlError("the control socket's server does not know Tor's cookie")
        await self.checked(f"AUTHENTICATE {client_hash.hex()}")

    async def getinfo(self, key: str) -> str:
        """The value of one GETINFO key."""
        if not _KEY_RE.fullmatch(key):
            raise ValueError("bad GETINFO key")
        reply = await self.checked(f"GETINFO {key}")
        for line in reply.lines:
            if line.startswith(key + "="):
                value = line[len(key) + 1 :]
                return value[1:] if value.startswith("\n") else value
        raise ControlError("malformed control reply")

    async def bootstrap(self) -> Bootstrap:
        return parse_bootstrap(await self.getinfo("status/bootstrap-phase"))

    async def socks_listener(self) -> tuple[str, int]:
        """The first SOCKS listener as (host, port): ``"127.0.0.1:PORT"`` in GETINFO."""
        value = (await self.getinfo("net/listeners/socks")).strip()
        first = value.split(" ", 1)[0]
        if first.startswith('"'):
            first, _ = unquote(first)
        host, _, port = first.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ControlError("Tor has no SOCKS listener")
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = False
        if not loopback:  # the torrc says 127.0.0.1: anything else is not our Tor's doing
            raise ControlError("Tor's SOCKS listener is not on loopback")
        return host.strip("[]"), int(port)
