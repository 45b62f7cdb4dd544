"""The Tor the daemon runs for itself (network mode ``tor``): start it, follow its bootstrap,
restart it when it dies, stop it with the daemon. docs/protocol.md §20.8.

The process is Debian's (or the system's) ``tor``, configured only by the torrc made here and
handed over on its standard input (``-f -``: bridge lines never lie in a file): its
DataDirectory is ``<profile>/tor`` (0700), its control port a Unix socket in it with cookie
authentication, its SOCKS port ``127.0.0.1:auto``. A Unix SOCKS socket would keep other local
users off it, but aiohttp-socks (python-socks) can only dial a SOCKS server over TCP; with
IsolateSOCKSAuth and the daemon's random per-connection credentials, another local user who
finds the port gets circuits of their own, never ours. Tor is bound to the daemon twice:
``__OwningControllerProcess`` (it exits when the daemon's PID does) and TAKEOWNERSHIP (it exits
when our control connection closes), so it cannot outlive the daemon, even after a kill -9.

Nothing Tor prints reaches the daemon's log: its notices can name guard relays and bridges
(which say something about the user). Its last lines stay in memory; when Tor exits, its last
complaint, scrubbed of addresses, fingerprints and onion names, becomes the reason ``status``
and the ``tor.failed`` event show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from aegisd.aio import cancel_and_wait
from aegisd.netmode import INSTALL_HINT, find_tor, is_executable
from aegisd.paths import MAX_SOCKET_PATH_BYTES

from .torcontrol import Bootstrap, ControlError, TorControl, parse_bootstrap

log = logging.getLogger("aegisd.tor")

CONTROL_SOCKET = "control"
COOKIE_FILE = "control_auth_cookie"
TORRC = "torrc"  # written by earlier versions; removed at start
START_TIMEOUT = 30.0  # seconds for Tor to open its control socket
STOP_TIMEOUT = 5.0
RESTART_FIRST = 1.0
RESTART_MAX = 60.0
STABLE_AFTER = 60.0  # a Tor that ran this long after bootstrapping resets the failure count
TAIL_LINES = 20
MAX_OUTPUT_LINE = 2000  # longer lines of Tor's output are cut
MAX_BRIDGES = 16
MAX_BRIDGE_LINE = 1024
_TRANSPORT_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ADDR_RE = re.compile(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]{2,45}\]):\d{1,5}")
_FINGERPRINT_RE = re.compile(r"[0-9A-Fa-f]{40}")
_TORRC_SAFE = re.compile(r'[^"\\\x00-\x1f\x7f]+')
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._+\-]+")  # written unquoted (ClientTransportPlugin)
_ARG_RE = re.compile(r"[A-Za-z0-9_\-]{1,32}=[A-Za-z0-9+/=_\-.,:]{0,512}")


class TorConfigError(ValueError):
    """A Tor setting (program path, bridge line) is refused; the message says why."""


def check_tor_path(path: str) -> str:
    """An absolute path to an executable file."""
    if not path or "\n" in path or "\r" in path or "\0" in path:
        raise TorConfigError("the tor path must be one absolute path")
    if not os.path.isabs(path):
        raise TorConfigError("the tor path must be absolute, e.g. /usr/sbin/tor")
    if not is_executable(path):
        raise TorConfigError("the tor path is not an executable file")
    return path


def check_bridge_line(line: str) -> str:
    """A bridge line as Tor Browser and bridges.torproject.org give them: ``[obfs4] IP:PORT
    [FINGERPRINT] [key=value ...]``, normalised to single spaces. Everything in it is checked
    character by character, since it is written into the torrc."""
    text = line.strip()
    if text.lower().startswith("bridge "):
        text = text[7:].strip()
    if not text or len(text) > MAX_BRIDGE_LINE:
        raise TorConfigError(f"a bridge line is 1 to {MAX_BRIDGE_LINE} characters")
    words = text.split()
    transport = None
    if _TRANSPORT_RE.fullmatch(words[0]):
        transport = words.pop(0)
        if transport != "obfs4":
            raise TorConfigError("only obfs4 bridges and plain bridges are supported")
    if not words or not _ADDR_RE.fullmatch(words[0]):
        raise TorConfigError("a bridge line needs an address: [obfs4] IP:PORT [FINGERPRINT] ...")
    rest = words[1:]
    if rest and _FINGERPRINT_RE.fullmatch(rest[0]):
        rest = rest[1:]
    for arg in rest:
        if not _ARG_RE.fullmatch(arg):
            raise TorConfigError("a bridge line's arguments must be key=value")
    if transport is None and rest:
        raise TorConfigError("a plain bridge takes no key=value arguments")
    if transport == "obfs4" and not any(a.startswith("cert=") for a in rest):
        raise TorConfigError("an obfs4 bridge line needs its cert=... argument")
    return " ".join(([transport] if transport else []) + words)


def bridge_transport(line: str) -> str | None:
    first = line.split(" ", 1)[0]
    return first if _TRANSPORT_RE.fullmatch(first) else None


@dataclass(frozen=True)
class TorConfig:
    """What the torrc is made of."""

    data_dir: Path
    #: The configured tor program (network.tor_path); None: looked for at every start.
    tor_path: str | None = None
    bridges: tuple[str, ...] = ()
    obfs4: str | None = None
    #: Test networks only (aegisd --test-methods with AEGISD_TOR_EXTRA_TORRC): lines that
    #: point this Tor at a private network on loopback.
    extra_lines: tuple[str, ...] = ()

    @property
    def control_socket(self) -> Path:
        return self.data_dir / CONTROL_SOCKET

    def torrc(self, owner_pid: int) -> str:
        d = self.data_dir
        if not _TORRC_SAFE.fullmatch(str(d)):
            raise TorConfigError(
                "the profile's path holds characters Tor's configuration cannot take "
                '(quotes, backslashes or control characters): choose another --home'
            )
        if len(os.fsencode(self.control_socket)) > MAX_SOCKET_PATH_BYTES:
            raise TorConfigError(
                f"the profile's path is too long for Tor's control socket ({self.control_socket}"
                f" is over {MAX_SOCKET_PATH_BYTES} bytes): choose a shorter --home"
            )
        lines = [
            f'DataDirectory "{d}"',
            f'ControlPort unix:"{self.control_socket}"',
            "CookieAuthentication 1",
            f'CookieAuthFile "{d / COOKIE_FILE}"',
            # IsolateSOCKSAuth is Tor's default; named so nobody removes it by accident.
            "SocksPort 127.0.0.1:auto IsolateSOCKSAuth",
            "SafeLogging 1",
            "Log notice stdout",
            "ClientOnly 1",
            "AvoidDiskWrites 1",
            f"__OwningControllerProcess {owner_pid}",
        ]
        if self.bridges:
            lines.append("UseBridges 1")
            if any(bridge_transport(b) == "obfs4" for b in self.bridges):
                if self.obfs4 is None:
                    raise TorConfigError("an obfs4 bridge needs obfs4proxy: apt install obfs4proxy")
                # Tor takes the rest of this line as the command and does not unquote it.
                if not _PLAIN_PATH.fullmatch(self.obfs4):
                    raise TorConfigError("the obfs4proxy path holds characters Tor cannot run")
                lines.append(f"ClientTransportPlugin obfs4 exec {self.obfs4}")
            lines += [f"Bridge {b}" for b in self.bridges]
        lines += list(self.extra_lines)
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TorStatus:
    """What ``status`` shows of the managed Tor."""

    state: str = "stopped"  # stopped | starting | bootstrapping | ready | restarting | failed
    progress: int = 0
    tag: str = ""
    summary: str = ""
    reason: str | None = None
    failures: int = 0
    retry_in: float | None = None
    pid: int | None = None
    tail: tuple[str, ...] = field(default=(), repr=False)

    def describe(self) -> str:
        """One line for a person: what Tor is doing, or why it is not working."""
        if self.state == "ready":
            return "Tor is ready"
        if self.state == "bootstrapping":
            return f"Tor is bootstrapping: {self.progress}% ({self.summary or self.tag})"
        if self.state == "starting":
            return "Tor is starting"
        if self.state in ("restarting", "failed"):
            again = f"; trying again in {self.retry_in:.0f} s" if self.retry_in else ""
            keeps = f" (failed {self.failures} times in a row)" if self.failures > 1 else ""
            return f"Tor is not running: {self.reason}{keeps}{again}"
        return "Tor is stopped"

    def to_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "progress": self.progress,
            "tag": self.tag,
            "summary": self.summary,
            "reason": self.reason,
            "failures": self.failures,
            "retry_in": self.retry_in,
            "description": self.describe(),
        }


class TorUnavailable(Exception):
    """The managed Tor cannot carry a connection now; str() says why (no address in it)."""


StatusCallback = Callable[[TorStatus, TorStatus], None]


class ManagedTor:
    """Runs one tor process for the daemon and keeps it running until ``stop``."""

    def __init__(self, config: TorConfig, on_change: StatusCallback | None = None) -> None:
        self.config = config
        self.status = TorStatus()
        self.ready = asyncio.Event()
        self.socks: tuple[str, int] | None = None
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._control: TorControl | None = None
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._stopping = False

    def _set(self, **changes: object) -> None:
        old = self.status
        self.status = replace(old, tail=tuple(self._tail), **changes)  # type: ignore[arg-type]
        if self.status.state != old.state:  # a life-cycle line; the state's name, not Tor's words
            log.info("managed Tor: %s", self.status.state)
        if self.on_change is not None:
            self.on_change(old, self.status)

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._supervise(), name="tor")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._set(state="stopped", retry_in=None, pid=None)

    async def wait_ready(self, timeout: float) -> None:
        """Return once Tor can carry connections, or raise TorUnavailable saying why."""
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            raise TorUnavailable(self.status.describe()) from None

    def socks_address(self) -> tuple[str, int]:
        if self.socks is None or not self.ready.is_set():
            raise TorUnavailable(self.status.describe())
        return self.socks

    # --- supervision ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            ready_at: list[float] = []
            try:
                reason = await self._run_once(ready_at)
            except (TorConfigError, ControlError, OSError) as exc:
                reason = _clean(str(exc))
            except Exception as exc:  # never let supervision die: restart after a pause
                log.error("managed Tor failed: %s", type(exc).__name__)
                reason = "internal error"
            if self._stopping:
                return
            stable = bool(ready_at) and time.monotonic() - ready_at[0] >= STABLE_AFTER
            failures = 1 if stable else failures + 1
            delay = min(RESTART_MAX, RESTART_FIRST * 2 ** (failures - 1))
            # Not Tor's words (the reason): they can name relays. Status and events have them.
            log.warning(
                "the managed Tor stopped after %.0f s; restarting it in %.0f s",
                time.monotonic() - started, delay,
            )
            self._set(
                state="restarting" if failures < 4 else "failed",
                reason=reason, failures=failures, retry_in=delay, pid=None,
            )  # fmt: skip
            await asyncio.sleep(delay)

    async def _run_once(self, ready_at: list[float]) -> str:
        """Run Tor until it exits; return why it is no longer running."""
        cfg = self.config
        _private_dir(cfg.data_dir)
        for stale in (cfg.control_socket, cfg.data_dir / TORRC):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # a socket of a Tor that was killed; an earlier version's torrc
        torrc = cfg.torrc(os.getpid()).encode()
        self._tail.clear()
        self._set(state="starting", progress=0, tag="", summary="", retry_in=None)
        executable = find_tor(cfg.tor_path)
        if executable is None:
            raise TorConfigError(
                "the configured tor program is missing" if cfg.tor_path else
                f"no tor program found: {INSTALL_HINT}"
            )
        # The configuration on stdin, no defaults file (no system default applies).
        proc = await asyncio.create_subprocess_exec(
            executable, "-f", "-", "--defaults-torrc", os.devnull,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the daemon's terminal is the daemon's to handle
        )  # fmt: skip
        self._proc = proc
        self._set(pid=proc.pid)
        reader = asyncio.create_task(self._read_output(proc))
        try:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):  # Tor exited at once: its output says why
                proc.stdin.write(torrc)
                await proc.stdin.drain()
            proc.stdin.close()
            control = await self._connect_control(proc)
            self._control = control
            control.on_event = self._on_event
            await control.checked("TAKEOWNERSHIP")
            await control.checked("SETEVENTS STATUS_CLIENT")
            self.socks = await control.socks_listener()
            self._on_bootstrap(await control.bootstrap())
            waiters = {
                asyncio.ensure_future(proc.wait()),
                asyncio.ensure_future(control.closed.wait()),
            }
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if self.ready.is_set():
                ready_at.append(self._ready_since)
            if proc.returncode is None:  # the control socket closed first: is Tor exiting?
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 2.0)
            if proc.returncode is None:
                return "Tor closed its control connection"
            return self._exit_reason(proc.returncode)
        finally:
            self.ready.clear()
            self.socks = None
            if self._control is not None:
                await self._control.close()  # TAKEOWNERSHIP: Tor exits on this
                self._control = None
            await _end(proc)
            await cancel_and_wait(reader)
            self._proc = None

    async def _connect_control(self, proc: asyncio.subprocess.Process) -> TorControl:
        deadline = time.monotonic() + START_TIMEOUT
        sock = self.config.control_socket
        while not sock.exists():
            if proc.returncode is not None:
                raise OSError(0, self._exit_reason(proc.returncode))
            if time.monotonic() > deadline:
                raise ControlError("Tor did not open its control socket in time")
            await asyncio.sleep(0.05)
        control = await TorControl.connect(sock)
        try:
            await control.authenticate(self.config.data_dir / COOKIE_FILE)
        except BaseException:
            await control.close()
            raise
        return control

    def _exit_reason(self, code: int) -> str:
        if code < 0:
            return f"Tor was killed by signal {-code}"
        # Tor's own last complaint says the most ("[err] ...", else "[warn] ..."), cleaned.
        for level in ("[err]", "[warn]"):
            for line in reversed(self._tail):
                if level in line and "as root" not in line:
                    return f"Tor exited ({code}): {_clean(line.split(']', 1)[-1].strip())}"
        return f"Tor exited with status {code}"

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        """Keep Tor's last lines (cut to MAX_OUTPUT_LINE), reading in chunks so that no line,
        however long, stops the reading (Tor would then block writing its log)."""
        assert proc.stdout is not None
        partial = b""
        while chunk := await proc.stdout.read(65536):
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()[:MAX_OUTPUT_LINE]
            for raw in lines:
                self._tail.append(raw[:MAX_OUTPUT_LINE].decode("utf-8", "replace").rstrip())

    def _on_event(self, text: str) -> None:
        if not text.startswith("STATUS_CLIENT "):
            return
        with contextlib.suppress(ControlError):
            self._on_bootstrap(parse_bootstrap(text[len("STATUS_CLIENT ") :]))

    def _on_bootstrap(self, b: Bootstrap) -> None:
        if b.done:
            if not self.ready.is_set():
                self._ready_since = time.monotonic()
                self.ready.set()
            self._set(state="ready", progress=100, tag=b.tag, summary=b.summary, reason=None,
                      retry_in=None)  # fmt: skip
            return
        if b.progress < self.status.progress and self.status.state == "bootstrapping":
            return  # a late event of an earlier phase
        self._set(state="bootstrapping", progress=b.progress, tag=b.tag, summary=b.summary,
                  reason=_clean(b.warning) if b.warning else None)  # fmt: skip

    _ready_since = 0.0


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)  # a client Tor exits at once (no ShutdownWaitLength)
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # Tor refuses a DataDirectory others can read


_SCRUB = (
    # relay and bridge identities: $FINGERPRINT~nickname, RSA_ID=..., bare fingerprints
    (re.compile(r"\$?\b[0-9A-Fa-f]{40}\b(~\w+)?"), "[relay]"),
    (re.compile(r"\b[a-z2-7]{16}(?:[a-z2-7]{40})?\.onion\b", re.IGNORECASE), "[onion]"),
    (re.compile(r"\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b"), "[address]"),
    (re.compile(r"\[[0-9A-Fa-f:.]+\](:\d+)?"), "[address]"),
    (re.compile(r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:)*"
                r"[0-9A-Fa-f]{0,4}::(?:[0-9A-Fa-f]{1,4}:)*[0-9A-Fa-f]{0,4})(?![\w:])"),
     "[address]"),
)


def _clean(text: str) -> str:
    """A reason shown in status and events: one line, bounded, without addresses, relay
    fingerprints or onion names (Tor's SafeLogging scrubs only what concerns the user's own
    traffic)."""
    one = " ".join(text.split())
    for pattern, replacement in _SCRUB:
        one = pattern.sub(replacement, one)
    return one[:200]
