"""A private Tor network on loopback, for the test suite and the benchmarks.

Three directory authorities, an exit, a middle relay and an onion-service host, each a real
`tor` process on its own 127.0.0.x address, with keys made here (`tor-gencert`) and every port
allocated at start. Nothing in it can reach beyond loopback:

- every node names only these authorities (`DirAuthority` replaces the built-in authorities and
  fallback directories), so no tor ever asks the real Tor network for anything;
- every node binds its outgoing IPv4 sockets to 127.0.0.1 (`OutboundBindAddress`): tor skips
  that bind for loopback destinations, and the kernel refuses (EINVAL) to connect a socket
  bound to 127.0.0.1 anywhere else, so even a mistaken address cannot leave the machine (no
  node has or uses IPv6: relays advertise IPv4 only, the exit does not exit to IPv6);
- the exit resolves names only through 127.0.0.1 (its own resolv.conf); tests use IP literals
  and onion names, never `localhost`.

`TorNetwork.start()` returns once the network is usable the way a client uses it: a short-lived
client tor, configured with `client_torrc_lines()` alone (what the daemon's managed tor adds in
test mode), has bootstrapped to 100 % and fetched through the exit on every exit port and
through the onion service. Benchmarks and people run it as

    python -m tests.tornet up DIR

which prints one JSON line (ports, onion name, client torrc lines, pids) and keeps the network
up until SIGTERM or SIGINT. Standard library only.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOR = "tor"
TOR_GENCERT = "tor-gencert"

# Consensus timing, in seconds. Authorities vote every VOTING_INTERVAL (it must divide 30 min),
# wait VOTE_DELAY for the others' votes and DIST_DELAY for their signatures (together less than
# half the interval, which tor uses while it has no consensus); a consensus is valid for two
# intervals. On loopback a vote reaches the others in well under a second. The same values
# serve before the first consensus (the TestingV3AuthInitial* options; tor's testing defaults
# wait 150 s), and the schedule is shifted (TestingV3AuthVotingStartOffset) so that the first
# vote falls FIRST_VOTE_AFTER seconds after the authorities start: the relays upload their
# descriptors about 2 s after the start, so the first consensus lists them all. Unshifted, the
# first vote falls anywhere in the next interval: 10 s later on average, and a vote before the
# relays' uploads costs a whole interval more.
VOTING_INTERVAL = 20
VOTE_DELAY = 2
DIST_DELAY = 2
FIRST_VOTE_AFTER = 4

# Ports are drawn at random below Linux's ephemeral range (32768-60999 by default), where the
# kernel's choice of a source port for some outgoing connection cannot take one between our
# check that it is free and the moment tor (or a test) binds it.
PORT_RANGE = (20000, 32000)

# One address per node, as in the Tor Project's chutney: each relay's ports stand apart in logs
# and in `ss`. Connections from tor still arrive from 127.0.0.1 (tor binds no source address
# for a loopback destination).
AUTHORITIES = (("a1", "127.0.0.11"), ("a2", "127.0.0.12"), ("a3", "127.0.0.13"))
EXIT = ("exit", "127.0.0.21")
MIDDLE = ("middle", "127.0.0.22")
ONION_HOST = ("hs", "127.0.0.31")
ONION_VIRTUAL_PORT = 80  # clients use ws://<onion_hostname>/v1/ws

# A client builds no circuit for user traffic before it knows enough relays to build this
# fraction of the possible paths. Said explicitly rather than taken from the consensus (tor's
# default 0.6; chutney's fast setups use 0.25): clients here fetch every relay's
# microdescriptor at once, from an authority, so any of these works.
PATHS_NEEDED = "0.67"


class TorNetworkError(RuntimeError):
    """The network could not be built or started, or a node died."""


def program(name: str) -> str | None:
    """The path of `name`: on PATH, or in /usr/sbin, where Debian puts tor and which is not on
    an ordinary user's PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def missing_programs() -> list[str]:
    """The programs this module needs that are not installed (Debian's package `tor` has both)."""
    return [p for p in (TOR, TOR_GENCERT) if program(p) is None]


def _exe(name: str) -> str:
    path = program(name)
    if path is None:
        raise TorNetworkError(f"{name} is not installed (Debian package: tor)")
    return path


def _port_is_free(address: str, port: int) -> bool:
    # No SO_REUSEADDR: a port with a connection in TIME_WAIT counts as taken, so that a test
    # binding it without SO_REUSEADDR cannot fail later.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


class _Ports:
    """Free TCP ports, each handed out once."""

    def __init__(self) -> None:
        self._taken: set[int] = set()

    def take(self, address: str = "127.0.0.1") -> int:
        for _ in range(1000):
            port = random.randint(*PORT_RANGE)
            if port not in self._taken and _port_is_free(address, port):
                self._taken.add(port)
                return port
        raise TorNetworkError(f"no free port in {PORT_RANGE} on {address}")


# ---- processes -----------------------------------------------------------------------------


def _spawn(directory: Path, lines: Iterable[str]) -> subprocess.Popen[bytes]:
    """Write `directory`/torrc and start tor on it in the foreground, as our child."""
    torrc = directory / "torrc"
    torrc.write_text("\n".join(lines) + "\n")
    empty = directory / "torrc-defaults"  # so that no system-wide defaults file is read
    empty.write_text("")
    with open(directory / "stdout.log", "ab") as out:
        # A session of its own: a Ctrl-C in the terminal reaches only the launcher, which stops
        # the tors in order; `__OwningControllerProcess` (in every torrc) ends them within 15 s
        # if the launcher dies without stopping them.
        return subprocess.Popen(
            [_exe(TOR), "-f", str(torrc), "--defaults-torrc", str(empty)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _terminate(procs: Iterable[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """SIGTERM every process (tor exits at once on it), SIGKILL what remains after `grace`."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


def _died(name: str, proc: subprocess.Popen[bytes], directory: Path) -> TorNetworkError:
    return TorNetworkError(
        f"tor {name} exited with {proc.returncode}:\n"
        + _tail(directory / "stdout.log")
        + _tail(directory / "notice.log")
    )


# ---- the control protocol: the few commands needed here (no stem) ---------------------------


def control(directory: Path, *commands: str, timeout: float = 10.0) -> list[str]:
    """Run control commands on the tor whose DataDirectory is `directory`.

    Talks to the Unix socket `directory`/control, authenticates with the cookie, and returns
    the reply lines of the last command without their status prefixes (`250-`, `250 `).
    """
    cookie = (directory / "control_auth_cookie").read_bytes().hex()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(directory / "control"))
        f = s.makefile("rwb")
        reply: list[str] = []
        for command in (f"AUTHENTICATE {cookie}", *commands):
            f.write(command.encode() + b"\r\n")
            f.flush()
            reply = _read_reply(f, command.split()[0])
        return reply


def _read_reply(f: io.BufferedIOBase, what: str) -> list[str]:
    lines: list[str] = []
    while True:
        raw = f.readline()
        if not raw:
            raise TorNetworkError(f"tor closed the control connection during {what}")
        line = raw.decode(errors="replace").rstrip("\r\n")
        if not line.startswith("250"):
            raise TorNetworkError(f"tor refused {what}: {line}")
        kind, text = line[3:4], line[4:]
        lines.append(text)
        if kind == "+":  # a data block, ended by a line holding a single dot
            while (data := f.readline().decode(errors="replace").rstrip("\r\n")) != ".":
                lines.append(data)
        elif kind == " ":
            return lines


def getinfo(directory: Path, key: str) -> str:
    """`GETINFO key` on the tor whose DataDirectory is `directory`: the value, unquoted."""
    first = control(directory, f"GETINFO {key}")[0]
    value = first.partition("=")[2]
    return value[1:-1] if value.startswith('"') else value


class ControlEvents:
    """A control connection that collects asynchronous events (`SETEVENTS names`).

    Tor queues the events in the socket until `lines()` reads them, so a connection opened
    early misses nothing that happens later.
    """

    def __init__(self, directory: Path, events: str, deadline: float) -> None:
        while True:  # the socket and the cookie appear a moment after tor starts
            try:
                cookie = (directory / "control_auth_cookie").read_bytes().hex()
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(10)
                self.sock.connect(str(directory / "control"))
                break
            except OSError:
                with contextlib.suppress(AttributeError):
                    self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._buffer = b""
        for command in (f"AUTHENTICATE {cookie}", f"SETEVENTS {events}"):
            self.sock.sendall(command.encode() + b"\r\n")
            line = self._line(deadline)
            if not line.startswith("250 "):
                self.close()
                raise TorNetworkError(f"tor refused {command.split()[0]}: {line}")

    def _line(self, deadline: float) -> str:
        while b"\r\n" not in self._buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)  # TimeoutError at the deadline
            if not chunk:
                raise TorNetworkError("tor closed the control connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line.decode(errors="replace")

    def lines(self, deadline: float) -> Iterator[str]:
        """Event lines ("650 ..."), as they come, until the deadline (then TimeoutError)."""
        while True:
            yield self._line(deadline)

    def close(self) -> None:
        self.sock.close()


# ---- SOCKS5 (for the readiness probe; tests use aiohttp_socks) ------------------------------


def socks5_connect(
    socks_port: int, host: str, port: int, *, username: str | None = None, timeout: float = 30
) -> socket.socket:
    """A TCP stream to host:port through the SOCKS5 proxy on 127.0.0.1:socks_port.

    The name is sent to the proxy (tor resolves it, or finds the onion service). A username
    (any password) puts the stream on a circuit of its own (tor's IsolateSOCKSAuth). Raises
    OSError with tor's SOCKS reply code when the proxy cannot connect.
    """
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=timeout)
    try:
        if username is None:
            s.sendall(b"\x05\x01\x00")
            _expect(s, b"\x05\x00", "SOCKS5 method")
        else:
            s.sendall(b"\x05\x01\x02")
            _expect(s, b"\x05\x02", "SOCKS5 method")
            user = username.encode()
            s.sendall(b"\x01" + bytes([len(user)]) + user + b"\x01x")
            _expect(s, b"\x01\x00", "SOCKS5 login")
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        head = _recv_exactly(s, 4)
        if head[1] != 0:
            raise OSError(f"SOCKS5 error {head[1]:#04x} connecting to {host}:{port}")
        size = {1: 4, 4: 16}.get(head[3]) or _recv_exactly(s, 1)[0]
        _recv_exactly(s, size + 2)  # the bound address and port
        return s
    except BaseException:
        s.close()
        raise


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise OSError("SOCKS5 proxy closed the connection")
        data += chunk
    return data


def _expect(s: socket.socket, want: bytes, what: str) -> None:
    got = _recv_exactly(s, len(want))
    if got != want:
        raise OSError(f"{what}: proxy answered {got!r}")


class _Echo:
    """A probe target on 127.0.0.1:port: answers a line with `ok <line>`, in a thread.

    It then waits for the other side to close first, so that the TIME_WAIT stays with tor's
    socket and not on this port, which a test binds next.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(60)
            line = conn.makefile("rb").readline()
            conn.sendall(b"ok " + line)
            while conn.recv(4096):
                pass

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not, and the
        # kernel would keep the port listening (owned by no fd) until that thread returned.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _probe(socks_port: int, host: str, port: int, timeout: float = 30) -> None:
    """One request through tor to an _Echo; a new circuit each time (a fresh username)."""
    with socks5_connect(
        socks_port, host, port, username=secrets.token_hex(8), timeout=timeout
    ) as s:
        s.sendall(b"tornet-probe\n")
        reply = s.makefile("rb").readline()
    if reply != b"ok tornet-probe\n":
        raise OSError(f"unexpected reply {reply!r} from {host}:{port}")


# ---- a client ---------------------------------------------------------------------------------


class TorClient:
    """A client tor on the network, as a test (or the launcher's probe) runs one.

    Its torrc is `network_lines` (TorNetwork.client_torrc_lines()) plus its own DataDirectory,
    a SOCKS port on 127.0.0.1 chosen by tor (`socks_port` once started; IsolateSOCKSAuth is on
    by default, ExtendedErrors gives onion-specific SOCKS errors), a control socket in its
    directory, and `__OwningControllerProcess` so it cannot outlive the process that started it.
    """

    def __init__(self, directory: Path, network_lines: list[str]) -> None:
        self.directory = directory
        self.network_lines = network_lines
        self.proc: subprocess.Popen[bytes] | None = None
        self.socks_port = 0

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise TorNetworkError("the client tor is not running")
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> None:
        """Start tor and return once it has bootstrapped to 100 %."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        d = self.directory
        self.proc = _spawn(d, [
            *self.network_lines,
            f"DataDirectory {d}",
            "SocksPort 127.0.0.1:auto ExtendedErrors",
            f"ControlSocket {d / 'control'}",
            "CookieAuthentication 1",
            f"Log notice file {d / 'notice.log'}",
            "SafeLogging 0",
            "OutboundBindAddress 127.0.0.1",
            f"__OwningControllerProcess {os.getpid()}",
        ])  # fmt: skip
        try:
            self._wait_bootstrapped(time.monotonic() + timeout)
            self.socks_port = int(getinfo(d, "net/listeners/socks").rpartition(":")[2])
        except BaseException:
            self.stop()
            raise

    def _wait_bootstrapped(self, deadline: float) -> None:
        phase = "not started"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise _died("client", self.proc, self.directory)
            with contextlib.suppress(OSError, TorNetworkError):
                phase = getinfo(self.directory, "status/bootstrap-phase")
                if "PROGRESS=100 " in phase:
                    return
            time.sleep(0.2)
        raise TorNetworkError(
            f"client tor did not bootstrap (last: {phase}):\n{_tail(self.directory / 'notice.log')}"
        )

    def newnym(self) -> None:
        """New circuits for new streams, and forget failed onion-service lookups."""
        control(self.directory, "SIGNAL NEWNYM")

    def stop(self) -> None:
        if self.proc is not None:
            _terminate([self.proc])

    def __enter__(self) -> TorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the network ------------------------------------------------------------------------------


@dataclass
class Node:
    """One tor process of the network; its DataDirectory holds torrc, notice.log, control."""

    name: str
    role: str  # "authority", "exit", "middle" or "hs"
    address: str
    directory: Path
    or_port: int = 0  # 0 for the onion-service host, which is not a relay
    dir_port: int = 0  # authorities only
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise TorNetworkError(f"tor {self.name} is not running")
        return self.proc.pid


class TorNetwork:
    """A private Tor network on 127.0.0.x: `start()`, use, `stop()` (or a `with` block).

    After start: `exit_ports` (127.0.0.1 ports the exit's policy names, for the tests' servers),
    `onion_port` (where the onion service's port 80 leads, on 127.0.0.1), `onion_hostname`,
    `pids` (node name -> pid; `exit_pid` and `hs_pid` for the two whose connections reach the
    tests' servers), `client_torrc_lines()`, `startup_times` (seconds from start() to each step).
    """

    def __init__(self, base_dir: Path, exit_ports: int = 4) -> None:
        self.base_dir = base_dir
        self.n_exit_ports = exit_ports
        self.nodes: dict[str, Node] = {}
        self.exit_ports: list[int] = []
        self.onion_port = 0
        self.onion_hostname = ""
        self.startup_times: dict[str, float] = {}
        self._dir_authority_lines: list[str] = []
        self._started = False

    # -- what users of the network need --

    @property
    def pids(self) -> dict[str, int]:
        return {n.name: n.pid for n in self.nodes.values() if n.proc is not None}

    @property
    def exit_pid(self) -> int:
        return self.nodes[EXIT[0]].pid

    @property
    def hs_pid(self) -> int:
        return self.nodes[ONION_HOST[0]].pid

    def client_torrc_lines(self) -> list[str]:
        """The torrc lines a client tor needs to use this network, and only this network."""
        return [
            # Lets tor accept private addresses everywhere and shortens its download delays;
            # allowed only with non-default DirAuthority lines, which then replace the real
            # network's authorities (and fallback directories) altogether.
            "TestingTorNetwork 1",
            *self._dir_authority_lines,
            "UseDefaultFallbackDirs 0",  # said explicitly: the real network's mirrors, never
            f"PathsNeededToBuildCircuits {PATHS_NEEDED}",
            # No entry guards: the first hop of each circuit is then chosen apart from its last.
            # With guards, tor (>= 0.4.7) does not keep an onion-service circuit's guard apart
            # from its last hop (circuit_should_use_vanguards()), and on five relays a client's
            # rendezvous circuit (guard, middle, rendezvous point) often had its guard as the
            # rendezvous point; the middle refuses to extend back to the previous hop, and a
            # new client's first onion connection took 30-35 s of such failures (4 starts of
            # 4). Guards protect nothing on a test network.
            "UseEntryGuards 0",
        ]

    def info(self) -> dict[str, Any]:
        """What `python -m tests.tornet up` prints, as a dict."""
        return {
            "exit_ports": self.exit_ports,
            "onion_port": self.onion_port,
            "onion_hostname": self.onion_hostname,
            "client_torrc_lines": self.client_torrc_lines(),
            "pids": self.pids,
            "exit_pid": self.exit_pid,
            "hs_pid": self.hs_pid,
            "directory": str(self.base_dir),
            "startup_times": self.startup_times,
        }

    def alive(self) -> bool:
        return all(n.proc is not None and n.proc.poll() is None for n in self.nodes.values())

    def control(self, node: str, *commands: str) -> list[str]:
        """Control commands on one node (see `control()`), e.g. GETINFO on the exit."""
        return control(self.nodes[node].directory, *commands)

    # -- lifecycle --

    def start(self, timeout: float = 180.0) -> None:
        """Build keys and torrcs, start every tor, and return once the network is usable."""
        if self._started:
            raise TorNetworkError("this network was already started")
        self._started = True
        missing = missing_programs()
        if missing:
            raise TorNetworkError(f"not installed: {', '.join(missing)} (Debian package: tor)")
        t0 = time.monotonic()
        deadline = t0 + timeout
        atexit.register(self.stop)
        try:
            self._plan()
            self._make_authority_keys()
            self.startup_times["keys"] = time.monotonic() - t0
            authorities = [n for n in self.nodes.values() if n.role == "authority"]
            others = [n for n in self.nodes.values() if n.role != "authority"]
            # The vote schedule counts from now: the authorities start right after this.
            offset = int(time.time() + FIRST_VOTE_AFTER + VOTE_DELAY + DIST_DELAY)
            offset %= VOTING_INTERVAL
            for node in authorities:
                node.proc = _spawn(node.directory, self._torrc(node, offset))
            # Relays upload their descriptors to the authorities' DirPorts: start them once
            # those listen (a refused upload is retried only later).
            for node in authorities:
                self._wait_listening(node, node.dir_port, deadline)
            for node in others:
                node.proc = _spawn(node.directory, self._torrc(node, offset))
            self.startup_times["started"] = time.monotonic() - t0
            self.onion_hostname = self._wait_onion_hostname(deadline)
            # Before the onion host can have a consensus, so no upload event is missed.
            hs_events = ControlEvents(self.nodes[ONION_HOST[0]].directory, "HS_DESC", deadline)
            try:
                self._wait_usable(t0, deadline, hs_events)
            finally:
                hs_events.close()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every tor of the network (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        nodes = list(self.nodes.values())[::-1]  # onion host and relays before the authorities
        _terminate(n.proc for n in nodes if n.proc is not None)
        atexit.unregister(self.stop)

    def __enter__(self) -> TorNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- building --

    def _plan(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if any(self.base_dir.iterdir()):
            raise TorNetworkError(f"{self.base_dir} is not empty")
        self.base_dir.chmod(0o700)
        ports = _Ports()
        roles = [*(("authority", *a) for a in AUTHORITIES), ("exit", *EXIT),
                 ("middle", *MIDDLE), ("hs", *ONION_HOST)]  # fmt: skip
        for role, name, address in roles:
            d = self.base_dir / name
            d.mkdir(mode=0o700)
            node = Node(name, role, address, d)
            if role != "hs":
                node.or_port = ports.take(address)
            if role == "authority":
                node.dir_port = ports.take(address)
            self.nodes[name] = node
        self.exit_ports = [ports.take() for _ in range(self.n_exit_ports)]
        self.onion_port = ports.take()
        # Exits ask this resolver only; nothing answers on 127.0.0.1:53 (tests use IPs).
        (self.base_dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def _make_authority_keys(self) -> None:
        """Per authority: a v3 identity and signing certificate, and the relay identity key."""
        authorities = [n for n in self.nodes.values() if n.role == "authority"]
        for n in authorities:
            (n.directory / "keys").mkdir(mode=0o700)
        gencerts = [
            subprocess.Popen(
                [_exe(TOR_GENCERT), "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
                 "-a", f"{n.address}:{n.dir_port}",
                 "-i", str(n.directory / "keys" / "authority_identity_key"),
                 "-s", str(n.directory / "keys" / "authority_signing_key"),
                 "-c", str(n.directory / "keys" / "authority_certificate")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=n.directory,
            )
            for n in authorities
        ]
        for n, p in zip(authorities, gencerts, strict=True):
            out, _ = p.communicate(b"\n", timeout=60)  # an empty passphrase
            if p.returncode != 0:
                raise TorNetworkError(f"tor-gencert for {n.name} failed:\n{out.decode()}")
        empty = self.base_dir / "torrc-defaults"
        empty.write_text("")
        listings = [
            subprocess.Popen(
                [_exe(TOR), "--list-fingerprint", "--quiet", "--ignore-missing-torrc",
                 "-f", str(n.directory / "none"), "--defaults-torrc", str(empty),
                 "--datadirectory", str(n.directory), "--orport", "1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            for n in authorities
        ]
        self._dir_authority_lines = []
        for n, p in zip(authorities, listings, strict=True):
            out, _ = p.communicate(timeout=60)
            if p.returncode != 0:
                raise TorNetworkError(f"tor --list-fingerprint for {n.name} failed:\n{out!r}")
            fingerprint = (n.directory / "fingerprint").read_text().split()[1]
            cert = (n.directory / "keys" / "authority_certificate").read_text()
            v3ident = next(
                line.split()[1] for line in cert.splitlines() if line.startswith("fingerprint ")
            )
            self._dir_authority_lines.append(
                f"DirAuthority {n.name} orport={n.or_port} no-v2 v3ident={v3ident} "
                f"{n.address}:{n.dir_port} {fingerprint}"
            )

    def _torrc(self, node: Node, vote_offset: int) -> list[str]:
        d = node.directory
        lines = [
            f"# {node.name}: the {node.role} of a private Tor network (tests/tornet.py)",
            *self.client_torrc_lines(),
            f"DataDirectory {d}",
            f"Nickname {node.name}",
            f"Log notice file {d / 'notice.log'}",
            "SafeLogging 0",  # a test network: addresses in the logs help, and are all ours
            "LogTimeGranularity 1",
            "ShutdownWaitLength 0",  # a relay otherwise lingers 30 s after SIGINT
            f"ControlSocket {d / 'control'}",
            "CookieAuthentication 1",
            f"__OwningControllerProcess {os.getpid()}",
            # See the module docstring: with this, no socket of this tor can leave loopback.
            "OutboundBindAddress 127.0.0.1",
            "SocksPort 0",
        ]
        if node.role == "hs":
            return [
                *lines,
                f"HiddenServiceDir {d / 'hidden_service'}",
                f"HiddenServicePort {ONION_VIRTUAL_PORT} 127.0.0.1:{self.onion_port}",
            ]
        lines += [
            f"Address {node.address}",
            f"ORPort {node.address}:{node.or_port}",
            "ContactInfo tornet@test.invalid",
            # Publish the descriptor at once instead of testing our own reachability first;
            # on an authority: list every relay it is connected to as Running.
            "AssumeReachable 1",
            # The exit must not ask the machine's resolver (which may forward off the
            # machine), nor test it for hijacking with well-known names.
            f"ServerDNSResolvConfFile {self.base_dir / 'resolv.conf'}",
            "ServerDNSDetectHijacking 0",
            "ServerDNSTestAddresses",
        ]
        if node.role == "authority":
            return [
                *lines,
                f"DirPort {node.address}:{node.dir_port}",
                "AuthoritativeDirectory 1",
                "V3AuthoritativeDirectory 1",
                f"V3AuthVotingInterval {VOTING_INTERVAL}",
                f"V3AuthVoteDelay {VOTE_DELAY}",
                f"V3AuthDistDelay {DIST_DELAY}",
                f"TestingV3AuthInitialVotingInterval {VOTING_INTERVAL}",
                f"TestingV3AuthInitialVoteDelay {VOTE_DELAY}",
                f"TestingV3AuthInitialDistDelay {DIST_DELAY}",
                f"TestingV3AuthVotingStartOffset {vote_offset}",
                "V3AuthNIntervalsValid 2",
                # Flags a new relay would otherwise earn over days of uptime and bandwidth. Exit
                # goes to the exit alone: a client treats an Exit-flagged relay as a candidate
                # even when its policy rejects everything, and wastes its first attempts there.
                f"TestingDirAuthVoteExit {EXIT[1]}",
                "TestingDirAuthVoteGuard *",
                f"TestingDirAuthVoteHSDir {','.join(a for _, a in AUTHORITIES)}",
                "TestingMinExitFlagThreshold 0",
                # For every tor on the network, through the consensus: no circuit build timeout
                # learnt from measured build times (the fixed 60 s instead). Loopback circuits
                # build in a few ms, and after 100 of them the onion host had learnt a 41 ms
                # timeout: every rendezvous circuit slower than that under load was abandoned,
                # and new clients' onion connections failed 12 min into a run.
                "ConsensusParams cbtdisabled=1",
                "ExitRelay 0",
                "ExitPolicy reject *:*",
            ]
        # The authorities are the only directory caches: a relay serves a new consensus
        # before it has fetched the microdescriptors it lists, and a client that asked it
        # then got 404 and waited 10 s to ask again (bootstrap 2 s, or 12-22 s). Onion
        # descriptors live on the authorities too (HSDir).
        lines.append("DirCache 0")
        if node.role == "exit":
            # Clients pick an exit by the consensus's summary of its policy, which counts only
            # `accept *:PORT` rules: with loopback alone (`accept 127.0.0.0/8:*`) the summary
            # says "reject 1-65535" and clients find no exit. Each exit port is accepted for
            # every address, which OutboundBindAddress confines to loopback.
            return [
                *lines,
                "ExitRelay 1",
                "ExitPolicyRejectPrivate 0",
                "ExitPolicy accept 127.0.0.0/8:*",
                *(f"ExitPolicy accept *:{p}" for p in self.exit_ports),
                "ExitPolicy reject *:*",
            ]
        return [*lines, "ExitRelay 0", "ExitPolicy reject *:*"]

    # -- waiting --

    def _check_alive(self) -> None:
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is not None:
                raise _died(n.name, n.proc, n.directory)

    def _wait_listening(self, node: Node, port: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                socket.create_connection((node.address, port), timeout=1).close()
                return
            time.sleep(0.05)
        raise TorNetworkError(f"tor {node.name} does not listen on {node.address}:{port}")

    def _wait_onion_hostname(self, deadline: float) -> str:
        path = self.nodes[ONION_HOST[0]].directory / "hidden_service" / "hostname"
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                name = path.read_text().strip()
                if name.endswith(".onion"):
                    return name
            time.sleep(0.05)
        raise TorNetworkError("the onion-service host wrote no hostname")

    def _wait_consensus(self, deadline: float) -> None:
        """Until every authority serves a consensus listing every relay as Running, and the exit
        with the Exit flag and every exit port in its policy summary (clients pick exits by it).

        A client bootstrapping on an earlier consensus would wait for the next one.
        """
        authorities = [n for n in self.nodes.values() if n.role == "authority"]
        while time.monotonic() < deadline:
            self._check_alive()
            relays = [_consensus_relays(a.address, a.dir_port) for a in authorities]
            if all(
                {"exit", "middle", *(a.name for a in authorities)} <= r.keys()
                and {"Exit", "Running", "Valid"} <= r["exit"][0]
                and {"Running", "Valid"} <= r["middle"][0]
                and set(self.exit_ports) <= _accepted_ports(r["exit"][1])
                for r in relays
            ):
                return
            time.sleep(0.5)
        raise TorNetworkError(
            "the authorities made no consensus with every relay in time:\n"
            + _tail(authorities[0].directory / "notice.log")
        )

    def _wait_hs_uploaded(self, events: ControlEvents, deadline: float) -> None:
        """Until the onion host has uploaded its descriptor and no upload is under way.

        A client asking before that finds no descriptor and fails the connection; tor asks the
        same directories again only 5 s later (on a test network) or after a NEWNYM.
        """
        pending: Counter[str] = Counter()
        uploaded = 0
        try:
            for line in events.lines(deadline):
                # 650 HS_DESC UPLOAD|UPLOADED|FAILED <address> <auth> <hsdir> ...
                parts = line.split()
                if len(parts) < 6 or parts[:2] != ["650", "HS_DESC"]:
                    continue
                action, hsdir = parts[2], parts[5].split("~")[0]
                if action == "UPLOAD":
                    pending[hsdir] += 1
                elif action in ("UPLOADED", "FAILED"):
                    pending[hsdir] -= 1
                    uploaded += action == "UPLOADED"
                if uploaded and not +pending:
                    return
        except TimeoutError:
            raise TorNetworkError(
                "the onion host uploaded no descriptor in time:\n"
                + _tail(self.nodes[ONION_HOST[0]].directory / "notice.log")
            ) from None

    def _wait_usable(self, t0: float, deadline: float, hs_events: ControlEvents) -> None:
        """A client bootstraps, then reaches an echo through the exit and the onion service."""
        self._wait_consensus(deadline)
        self.startup_times["consensus"] = time.monotonic() - t0
        client = TorClient(self.base_dir / "probe", self.client_torrc_lines())
        echoes = [_Echo(p) for p in (*self.exit_ports, self.onion_port)]
        try:
            client.start(timeout=max(1.0, deadline - time.monotonic()))
            self.startup_times["client_bootstrapped"] = time.monotonic() - t0
            targets = [("127.0.0.1", p) for p in self.exit_ports]
            self._retry(client, targets, deadline, "the exit")
            self.startup_times["exit_reachable"] = time.monotonic() - t0
            self._wait_hs_uploaded(hs_events, deadline)
            self.startup_times["onion_published"] = time.monotonic() - t0
            self._retry(client, [(self.onion_hostname, ONION_VIRTUAL_PORT)], deadline,
                        "the onion service")  # fmt: skip
            self.startup_times["onion_reachable"] = time.monotonic() - t0
        finally:
            client.stop()
            for e in echoes:
                e.close()

    def _retry(
        self, client: TorClient, targets: list[tuple[str, int]], deadline: float, what: str
    ) -> None:
        error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                for host, port in targets:
                    # Seconds on loopback when it works; a stuck attempt is given up early.
                    _probe(client.socks_port, host, port,
                           timeout=max(1.0, min(10.0, deadline - time.monotonic())))  # fmt: skip
                return
            except OSError as e:
                error = e
            # A failed onion lookup is not repeated at the same directories for 5 s (on a test
            # network); NEWNYM (granted once per 10 s) forgets it, and the circuits.
            with contextlib.suppress(OSError, TorNetworkError):
                client.newnym()
            time.sleep(1)
        raise TorNetworkError(f"{what} was not reachable through tor: {error}\n" + "".join(
            f"--- {n.name}:\n{_tail(n.directory / 'notice.log', 5)}"
            for n in self.nodes.values()
        ))  # fmt: skip


def _accepted_ports(summary: str) -> set[int]:
    """The ports of a policy summary such as 'accept 80,443,20000-20001' ('reject ...': none)."""
    kind, _, items = summary.partition(" ")
    ports: set[int] = set()
    if kind == "accept":
        for item in items.split(","):
            low, _, high = item.partition("-")
            ports.update(range(int(low), int(high or low) + 1))
    return ports


def _consensus_relays(address: str, dir_port: int) -> dict[str, tuple[set[str], str]]:
    """The relays of an authority's current consensus: nickname -> (flags, policy summary)."""
    relays: dict[str, tuple[set[str], str]] = {}
    conn = http.client.HTTPConnection(address, dir_port, timeout=5)
    try:
        conn.request("GET", "/tor/status-vote/current/consensus")
        response = conn.getresponse()
        if response.status != 200:  # 404 until the first consensus
            return relays
        name = ""
        for line in response.read().decode(errors="replace").splitlines():
            if line.startswith("r "):
                name = line.split()[1]
                relays[name] = (set(), "")
            elif line.startswith("s ") and name:
                relays[name] = (set(line.split()[1:]), "")
            elif line.startswith("p ") and name:
                relays[name] = (relays[name][0], line[2:])
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()
    return relays


# ---- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.tornet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a network in DIR and keep it up until SIGTERM/SIGINT")
    up.add_argument("dir", type=Path, help="a new or empty directory (keep its path short)")
    up.add_argument("--exit-ports", type=int, default=4)
    up.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    # SIGTERM ends the process like Ctrl-C does: through the `with` block, which stops every tor.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        with TorNetwork(args.dir, exit_ports=args.exit_ports) as net:
            try:
                net.start(timeout=args.timeout)
            except TorNetworkError as e:
                print(f"tornet: {e}", file=sys.stderr)
                return 1
            print(json.dumps(net.info()), flush=True)
            while net.alive():
                time.sleep(1)
            print("tornet: a tor of the network exited; stopping the others", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
