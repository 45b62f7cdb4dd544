"""One run: a relay, a tap in front of it, one namespace and daemon per user, the workload;
then what the adversary gets (the capture, the relay's database) and the ground truth (the
forwarders' labels, the schedule as sent, each profile's own store).

Processes: the relay and the daemons are real (`python -m relay.main`, `python -m aegisd.main
run`), with cheap proofs of work as the tests use. Each daemon runs inside its user's network
namespace (netns.py); the CLI's `init` too. Children are started from one long-lived thread
(`Spawner`) under `setpriv --pdeathsig TERM`, so that they die with this process even after a
kill -9 (the death signal follows the thread that forked them), and stopped in order by
`World.close()` on any exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aegis_cli.client import Client, DaemonNotRunning, RpcCallError
from aegisd.services.cover import POOL_SIZE

from . import workload as wl
from .capture import Capture, Label, Network
from .netns import Namespace
from .pages import row_places

RELAY_OPTIONS = ["--pow-deposit-bits", "8", "--pow-bundle-bits", "8", "--pow-blob-bits", "8",
    "--pow-create-bits", "8"]
T_READY = 60.0
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602


class BenchError(Exception):
    """The run cannot go on; the message says why, for people."""


def log(msg: str) -> None:
    print(f"[linkage {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- settings: what a configuration or a privacy level asks of every daemon ----------------------


@dataclass(frozen=True)
class Scaled:
    """A duration in seconds of use: sent divided by --compress, and only when --compress is
    not 1 (then the daemon runs with --test-methods, which such settings may need)."""

    seconds: float


@dataclass(frozen=True)
class Call:
    """One JSON-RPC call made on every daemon after it starts, before contacts are made."""

    method: str
    params: dict[str, Any]
    optional: bool = False  # True: a daemon that does not know it skips it (with a note)

    def resolved(self, compress: float) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for k, v in self.params.items():
            if isinstance(v, Scaled):
                if compress != 1:
                    out[k] = v.seconds / compress
            else:
                out[k] = v
        return out if out else None


def needs_test_methods(calls: list[Call], compress: float) -> bool:
    return compress != 1 and any(isinstance(v, Scaled) for c in calls for v in c.params.values())


@dataclass(frozen=True)
class Config:
    """How users reach the relay: `per-user` (each from its own 127.0.0.N) or
    `per-connection` (every connection from a fresh random loopback address, as Tor circuits
    would), and the settings that go with it."""

    addresses: str
    calls: tuple[Call, ...] = ()


# --- ground truth and what the adversary gets ---------------------------------------------------


@dataclass(frozen=True)
class Sent:
    t: float  # when messages.send was called
    sender: str
    recipient: str
    message_id: str


@dataclass
class ProfileTruth:
    """From one profile's own store: its mailboxes and where it deposits."""

    user: str
    owned: list[tuple[str, str | None, bytes, bytes]]  # role, contact user, owner_id, deposit_id
    send_to: dict[str, bytes]  # contact user -> the deposit_id it deposits to


@dataclass
class Truth:
    users: list[str]
    pairs: list[tuple[str, str]]
    active: list[tuple[str, str]]
    sent: list[Sent]
    labels: list[Label]
    profiles: dict[str, ProfileTruth]
    t_start: float  # the messaging phase
    t_end: float
    groups: list[list[str]] = field(default_factory=list)  # each group's members
    group_sent: list[tuple[float, str, int]] = field(default_factory=list)  # (t, sender, group)


@dataclass
class RelayDb:
    """The relay's `mailboxes` table as read at the end (every column, and `_rowid` when the
    table has one, `_page` and `_cell` where the row sits in the file: pages.py), or why it
    could not be read."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class RunData:
    capture: Capture
    db: RelayDb
    truth: Truth
    seconds: float  # wall time of the run


# --- processes ------------------------------------------------------------------------------


class Spawner:
    """Starts child processes from one thread that lives as long as they may."""

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[Callable[[], subprocess.Popen[bytes]], queue.Queue[Any]]]
        self._q = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="linkage-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            fn, reply = item
            try:
                reply.put(fn())
            except BaseException as exc:
                reply.put(exc)

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        reply: queue.Queue[Any] = queue.Queue()
        self._q.put((lambda: subprocess.Popen(argv, **kw), reply))
        out = reply.get()
        if isinstance(out, BaseException):
            raise out
        assert isinstance(out, subprocess.Popen)
        return out


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_until(pred: Callable[[], Any], what: str, timeout: float = T_READY,
               proc: subprocess.Popen[bytes] | None = None) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, DaemonNotRunning, RpcCallError, ValueError):
            value = pred()
            if value:
                return value
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


class User:
    """One person: a namespace, a profile, a daemon run inside the namespace."""

    def __init__(self, world: World, name: str, index: int) -> None:
        self.world, self.name = world, name
        self.home = world.base / name
        self.ns = Namespace(world.relay_port)
        assert self.ns.listener is not None
        source = f"127.0.0.{10 + index}" if world.config.addresses == "per-user" else None
        world.net.add_user(name, self.ns.listener, source)
        self.proc: subprocess.Popen[bytes] | None = None

    def init(self) -> None:
        r = subprocess.run(
            self.ns.command([sys.executable, "-m", "aegis_cli.main", "init", "--home",
                             str(self.home), "--no-passphrase", "--relay", self.world.relay_url,
                             "--direct"]),
            capture_output=True, text=True, timeout=120, check=False, pass_fds=(self.ns.fd,),
        )  # fmt: skip
        if r.returncode != 0:
            raise BenchError(f"aegis init ({self.name}) failed: {r.stderr.strip()}")

    def start(self) -> None:
        argv = [sys.executable, "-m", "aegisd.main", "run", "--home", str(self.home)]
        if self.world.test_methods:
            argv.append("--test-methods")
        with open(self.world.base / f"{self.name}.log", "ab") as err:
            self.proc = self.world.spawner.spawn(
                self.ns.command(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, pass_fds=(self.ns.fd,), start_new_session=True,
            )  # fmt: skip
        wait_until(lambda: self.call("version"), f"{self.name}'s daemon", proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with Client(self.home / "aegisd.sock", timeout=60) as c:
            return c.call(method, params)

    def connected(self) -> bool:
        return bool(self.call("status")["relay"]["connected"])

    def apply(self, calls: list[Call], why: str) -> list[str]:
        """Make the calls; a daemon that does not know one fails the run with a clear message
        (or skips an optional one, returning a note)."""
        notes = []
        for c in calls:
            params = c.resolved(self.world.compress)
            if params is None:
                continue
            try:
                self.call(c.method, params)
            except RpcCallError as exc:
                unknown = exc.code == METHOD_NOT_FOUND or (
                    exc.code == INVALID_PARAMS and "is not a parameter" in json.dumps(exc.data))
                what = (f"{why} needs {c.method} {json.dumps(params)}, which this daemon "
                        f"refuses: {exc.message} ({exc.code}"
                        f"{', ' + json.dumps(exc.data) if exc.data else ''})")  # fmt: skip
                if unknown and c.optional:
                    notes.append(f"{why}: skipped {c.method} {json.dumps(params)} "
                                 f"(not known to this daemon)")  # fmt: skip
                    continue
                if unknown:
                    what += ("; the daemon does not know it. Edit LEVELS or CONFIGS at the top of "
                             "bench/linkage.py to map this level to settings it knows")
                raise BenchError(what) from None
        return notes


class World:
    def __init__(self, base: Path, config: Config, level_calls: list[Call], compress: float,
                 seed: int) -> None:  # fmt: skip
        self.base = base
        self.config = config
        self.level_calls = level_calls
        self.compress = compress
        self.test_methods = needs_test_methods([*config.calls, *level_calls], compress)
        self.spawner = Spawner()
        self.relay: subprocess.Popen[bytes] | None = None
        self.relay_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.relay_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.relay_sock.bind(("127.0.0.1", 0))
        self.relay_sock.listen(1024)
        self.relay_port = self.relay_sock.getsockname()[1]
        self.net = Network(self.relay_port, seed)
        self.users: dict[str, User] = {}
        self.notes: list[str] = []
        self.rng = random.Random(seed ^ 0xD1CE)

    @property
    def relay_url(self) -> str:
        # The same URL for everyone: inside each namespace, 127.0.0.1:relay_port is ours.
        return f"ws://127.0.0.1:{self.relay_port}/v1/ws"

    @property
    def relay_data(self) -> Path:
        return self.base / "relay-data"

    def start_relay(self) -> None:
        # The relay serves the tap's connections only: it listens on its own socket, the
        # tap connects to it; the users' URL port is only ever reached inside namespaces.
        fd = self.relay_sock.fileno()
        with open(self.base / "relay.log", "wb") as out:
            self.relay = self.spawner.spawn(
                ["setpriv", "--pdeathsig", "TERM", "--", sys.executable, "-m", "relay.main",
                 "--listen-fd", str(fd), "--data", str(self.relay_data), *RELAY_OPTIONS],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                pass_fds=(fd,), start_new_session=True,
            )  # fmt: skip
        wait_until(lambda: "relay started" in (self.base / "relay.log").read_text(),
                   "the relay", proc=self.relay)  # fmt: skip

    def add_users(self, names: list[str]) -> None:
        for i, name in enumerate(names):
            self.users[name] = User(self, name, i)
        errors: list[BaseException] = []

        def init(u: User) -> None:
            try:
                u.init()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=init, args=(u,)) for u in self.users.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        # One after the other, a random while apart: people do not start their daemons (nor
        # change their settings, which remakes every connection) within the same second.
        for u in self.users.values():
            u.start()
            u.call("identity.set_name", {"display_name": u.name})
            self.notes += u.apply(list(self.config.calls), "the configuration")
            self.notes += u.apply(self.level_calls, "the privacy level")
            wait_until(u.connected, f"{u.name} connected to the relay")
            time.sleep(self.rng.uniform(0.5, 2.0))

    def warm_pools(self) -> None:
        """With cover on, wait until every daemon holds its pool of mailboxes made ahead: the
        run stands for contacts made some time after installing, not in the same minute."""
        def pools_full() -> bool:
            got = [u.call("privacy.get").get("slots") or {} for u in self.users.values()]
            return all(g.get("pool", 0) >= POOL_SIZE for g in got)

        first = next(iter(self.users.values()), None)
        if first is None or (first.call("privacy.get").get("slots") or {}).get("interval") is None:
            return
        t = time.monotonic()
        wait_until(pools_full, "every pool of mailboxes made ahead", timeout=300)
        log(f"pools of mailboxes made ahead in {time.monotonic() - t:.0f} s")

    def connect(self, adder: str, invitee: str) -> None:
        a, b = self.users[adder], self.users[invitee]
        link = b.call("invitations.create")["link"]
        a.call("contacts.add", {"name": invitee, "link": link})
        for me, other in ((a, invitee), (b, adder)):

            def established(me: User = me, other: str = other) -> bool:
                return any(c["name"] == other and c["established"]
                           for c in me.call("contacts.list")["contacts"])  # fmt: skip

            wait_until(established, f"{me.name}'s contact {other}")

    def make_group(self, gi: int, members: list[str]) -> dict[str, int]:
        """The first member creates group `gi` and invites the others (all its contacts), who
        accept; returns each member's local number for it, once everyone sees everyone."""
        owner = self.users[members[0]]
        name = f"g{gi}"
        refs = {owner.name: int(owner.call("group.create", {"name": name})["group"])}
        for m in members[1:]:
            owner.call("group.invite", {"group": refs[owner.name], "contact": m})
            u = self.users[m]

            def invitation(u: User = u) -> Any:
                return next((i["invitation"] for i in u.call("group.invitations")["invitations"]
                             if i["name"] == name), None)  # fmt: skip

            u.call("group.accept", {"invitation": wait_until(invitation, f"{m}'s invitation")})

        def ref(u: User) -> int | None:
            return next((int(g["group"]) for g in u.call("group.list")["groups"]
                         if g["name"] == name), None)  # fmt: skip

        for m in members[1:]:
            u = self.users[m]
            refs[m] = int(wait_until(partial(ref, u), f"{m} in {name}"))
        for m in members:

            def complete(m: str = m) -> bool:
                g = self.users[m].call("group.get", {"group": refs[m]})
                return len(g["members"]) == len(members) and all(
                    x["reachable"] for x in g["members"] if not x.get("you"))

            wait_until(complete, f"{m} to see all of {name}")
        return refs

    def delivered(self, sent: list[Sent]) -> int:
        """How many of `sent` their sender sees delivered (the receipt came back)."""
        want: dict[tuple[str, str], set[str]] = {}
        for s in sent:
            want.setdefault((s.sender, s.recipient), set()).add(s.message_id)
        done = 0
        for (sender, recipient), ids in want.items():
            before = None
            while True:
                params: dict[str, Any] = {"contact": recipient, "limit": 500}
                if before is not None:
                    params["before"] = before
                page = self.users[sender].call("messages.history", params)
                done += sum(1 for m in page["messages"]
                            if m["message_id"] in ids and m["status"] in ("delivered", "read"))
                before = page.get("next_before")
                if before is None:
                    break
        return done

    def read_relay_db(self) -> RelayDb:
        path = self.relay_data / "relay.sqlite3"
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error as exc:
            return RelayDb(error=f"cannot open {path.name}: {exc}")
        try:
            db.row_factory = sqlite3.Row
            try:
                rows = db.execute("SELECT rowid AS _rowid, * FROM mailboxes").fetchall()
            except sqlite3.OperationalError:  # WITHOUT ROWID, or no such table
                try:
                    rows = db.execute("SELECT * FROM mailboxes").fetchall()
                except sqlite3.OperationalError as exc:
                    return RelayDb(error=f"no mailboxes table: {exc}")
            out = [dict(r) for r in rows]
            places = row_places(db, "mailboxes")
            for row in out:
                place = places.get(row.get("_rowid"))  # type: ignore[arg-type]
                if place is not None:
                    row["_page"], row["_cell"] = place.page, place.rank
            return RelayDb(out)
        finally:
            db.close()

    def close(self) -> None:
        for u in self.users.values():
            with contextlib.suppress(Exception):
                u.stop()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                stop_process(self.relay)
            self.relay = None
        self.net.close()
        for u in self.users.values():
            u.ns.close()
        self.relay_sock.close()


# --- ground truth from the profiles' own stores ----------------------------------------------


def read_profile(user: str, home: Path) -> ProfileTruth:
    """Each mailbox the profile owns (role, contact, ids) and where it deposits, read from its
    SQLCipher store with the raw key of a no-passphrase profile (daemon stopped)."""
    import sqlcipher3

    key = json.loads((home / "keyring.json").read_text())["key"]
    db = sqlcipher3.connect(str(home / "aegis.db"))
    try:
        db.execute(f"PRAGMA key = \"x'{key}'\"")
        names = {cid: name for cid, name in db.execute("SELECT id, name FROM contacts")}
        owned = []
        for role, cid, desc in db.execute("SELECT role, contact_id, descriptor FROM mailboxes"):
            d = json.loads(desc)
            owned.append((str(role), names.get(cid), bytes.fromhex(d["owner_id"]),
                          bytes.fromhex(d["deposit_id"])))  # fmt: skip
        send_to = {}
        for name, state in db.execute("SELECT name, state FROM contacts"):
            to = json.loads(state or "{}").get("send_to") if state else None
            if to:
                send_to[str(name)] = bytes.fromhex(to["deposit_id"])
        return ProfileTruth(user, owned, send_to)
    finally:
        db.close()


# --- the run --------------------------------------------------------------------------------


def run(base: Path, work: wl.Workload, config: Config, level_calls: list[Call], compress: float,
        seed: int, drain: float) -> RunData:  # fmt: skip
    t_run = time.monotonic()
    world = World(base, config, level_calls, compress, seed)
    try:
        world.start_relay()
        log(f"relay on 127.0.0.1:{world.relay_port}, tap on {world.net.tap_port}; "
            f"starting {len(work.users)} users")  # fmt: skip
        world.add_users(work.users)
        for note in sorted(set(world.notes)):
            log(note)
        world.warm_pools()
        for i, (a, b) in enumerate(work.pairs):
            world.connect(a, b)
            log(f"contact {i + 1}/{len(work.pairs)}: {a} added {b}")
            time.sleep(world.rng.uniform(0.3, 1.5))

        group_refs: dict[tuple[str, int], int] = {}
        for gi, members in enumerate(work.groups):
            for m, r in world.make_group(gi, members).items():
                group_refs[(m, gi)] = r
            log(f"group {gi + 1}/{len(work.groups)}: {', '.join(members)}")
        group_sent: list[tuple[float, str, int]] = []

        sent: list[Sent] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        t0 = time.time()
        log(f"messaging for {work.duration:.0f} s: {len(work.sends)} texts on "
            f"{len(work.active)} of {len(work.pairs)} pairs, {len(work.away)} absences")

        def drive(user: User) -> None:
            try:
                for ev in work.events(user.name):
                    delay = t0 + ev.t - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    if isinstance(ev, wl.Send) and ev.recipient.startswith("#"):
                        gi = int(ev.recipient[1:])
                        t = time.time()
                        user.call("group.send", {"group": group_refs[(user.name, gi)],
                                                 "text": f"g{len(group_sent)} {t:.3f}"})
                        with lock:
                            group_sent.append((t, user.name, gi))
                    elif isinstance(ev, wl.Send):
                        t = time.time()
                        mid = user.call("messages.send", {"contact": ev.recipient,
                                                          "text": f"m{len(sent)} {t:.3f}"})
                        with lock:
                            sent.append(Sent(t, user.name, ev.recipient, mid["message_id"]))
                    else:
                        user.stop()
                        time.sleep(max(0.0, t0 + ev.t + ev.length - time.time()))
                        user.start()
                        wait_until(user.connected, f"{user.name} back online")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(u,), daemon=True)
                   for u in world.users.values()]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        sent.sort(key=lambda s: s.t)

        deadline = time.monotonic() + drain
        while (n := world.delivered(sent)) < len(sent):
            if time.monotonic() > deadline:
                raise BenchError(f"only {n} of {len(sent)} texts delivered {drain:.0f} s after "
                                 "the schedule ended (--drain)")  # fmt: skip
            time.sleep(0.5)
        time.sleep(1.0)
        t_end = time.time()
        log(f"all {len(sent)} texts delivered and acknowledged "
            f"{t_end - t0 - work.duration:.1f} s after the schedule")  # fmt: skip
        capture, labels = world.net.snapshot(t_end)
        db = world.read_relay_db()
        if world.net.errors:
            log(f"forwarder errors: {world.net.errors[:3]}")
        for u in world.users.values():
            u.stop()
        profiles = {name: read_profile(name, u.home) for name, u in world.users.items()}
        truth = Truth(work.users, work.pairs, work.active, sent, labels, profiles, t0, t_end,
                      work.groups, sorted(group_sent))  # fmt: skip
        return RunData(capture, db, truth, time.monotonic() - t_run)
    finally:
        world.close()
