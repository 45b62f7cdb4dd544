"""aegisd: one per user and profile. Owns the store; serves the JSON-RPC API.

Life cycle: take the profile lock (flock, so a second daemon on the same profile refuses to
start), unlock now if the profile has no passphrase or a passphrase file was given, bind the
socket, serve until ``daemon.stop``, SIGTERM or SIGINT, then close everything.

With a passphrase the daemon starts locked: the store is closed and only the methods that
need no store answer (version, status, unlock, passphrase.change, daemon.stop).

Extending (messaging, relay client): register methods on ``daemon.registry`` (see
aegisd/rpc/methods.py), emit events with ``daemon.events.emit(type, data)``, and start or
stop store-dependent services from ``daemon.on_unlock`` / ``daemon.on_lock`` hooks. Services
receive the daemon as a ``ServiceContext`` (aegisd/services/context.py) and never import
this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from . import __version__, droplog
from .passphrase_strength import is_weak, problem
from .paths import ProfilePaths
from .relayurl import SETTING_URL
from .rpc import AppError, CallContext, EventBus, InvalidParamsError, Registry, RpcServer
from .rpc import errors as E
from .rpc.events import PATTERN_RE, TYPE_RE, EventFilter
from .rpc.server import Connection, InheritedSocketError, inherited_socket
from .services.context import Hook
from .store import Keyring, KeyringError, NoPassphrase, Store, StoreError, WrongPassphrase

if TYPE_CHECKING:
    from .transport.network import Network

log = logging.getLogger("aegisd")

API_VERSION = 2
MAX_EVENTS_PAGE = 1000



class DaemonError(Exception):
    """The daemon cannot start; the message says why, in one line."""


def sd_notify(state: str) -> bool:
    """Tell the service manager about our state (sd_notify(3)): one datagram to the Unix
    socket named by NOTIFY_SOCKET ('@' for the abstract namespace). A no-op without it; a
    failure is logged, never fatal. Standard library: the protocol is one sendto()."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        log.warning("NOTIFY_SOCKET is neither a path nor an abstract socket: not notifying")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager: %s", exc.strerror)
        return False
    return True


class Daemon:
    def __init__(self, paths: ProfilePaths, *, test_methods: bool = False) -> None:
        self.paths = paths
        try:
            self.keyring = Keyring.load(paths.keyring)
        except KeyringError as exc:
            if not paths.keyring.exists():
                raise DaemonError(
                    f"no profile in {paths.home}: create one with: aegis init{paths.home_option()}"
                ) from None
            raise DaemonError(str(exc)) from None
        self.store: Store | None = None
        self.events = EventBus()
        self.registry = Registry(is_locked=lambda: self.store is None)
        #: Run after the store opens / before it closes (start and stop services there).
        self.on_unlock: list[Hook] = []
        self.on_lock: list[Hook] = []
        #: Held while the store opens or closes, and while settings restart services
        #: (services/connectivity.py): one at a time.
        self.auth = asyncio.Lock()
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self.server: RpcServer | None = None
        #: Set by the relay link as its connection goes up and down (a logged transition).
        self._relay_connected = False
        #: Whether the profile's passphrase breaks the strength rule (aegisd/passphrase_strength):
        #: known once it was typed (unlock), None before. Never stored or logged: a seized disk
        #: must not point at the weak profiles.
        self.weak_passphrase: bool | None = None if self.keyring.has_passphrase else False
        self.test_methods = test_methods
        self._register_core()
        # How relays are reached (network mode, the managed Tor): its hooks come first, so
        # that Tor is running before the relay link starts and stops after it.
        from .services import connectivity

        # The services get this daemon as a ServiceContext (services/context.py): the narrow
        # members they use, never the Daemon type (no import circle).
        self.connectivity = connectivity.Connectivity(self)
        connectivity.register(self.registry, self.connectivity)
        self.on_unlock.append(self.connectivity.on_unlock)
        self.on_lock.append(self.connectivity.on_lock)
        # Messaging: imported here so that a daemon module import stays light for tests.
        from .services import api as messaging_api
        from .services.messenger import Messenger

        self.messenger = Messenger(self)
        messaging_api.register(self.registry, self.messenger)
        from .services import backup as backup_api
        from .services import privacy_api

        backup_api.register(self.registry, self.messenger)
        from .services import devices as devices_api

        links = devices_api.register(self.registry, self.messenger).links
        privacy_api.register(self.registry, self.messenger, test_methods=test_methods)
        self.on_unlock.append(self.messenger.on_unlock)
        self.on_lock.append(self.messenger.on_lock)
        # After the messenger's: a lock (hooks run in reverse) ends a device link first; an
        # unlock retires a link mailbox left behind before the first connection deletes those.
        self.on_unlock.insert(0, links.on_unlock)
        self.on_lock.append(links.on_lock)
        # Calls: their hooks come after the messenger's, so a lock ends the calls first.
        from .calls.api import register as register_calls

        self.calls = register_calls(self.registry, self, self.messenger, test_methods=test_methods)
        if test_methods:
            self.registry.register("debug.emit", self.rpc_debug_emit, unlocked=True)

    # -- what the services use (services/context.py ServiceContext) ----------------------

    def network(self) -> Network:
        return self.connectivity.network()

    def network_mode(self) -> str:
        return self.connectivity.mode()

    async def reconfigure(self) -> None:
        await self.connectivity.reconfigure()

    async def restart_links(self) -> None:
        await self.messenger.mailboxes.restart_link()

    async def move_relay(self, url: str, insecure_plaintext: bool) -> tuple[int, int]:
        from .services.connectivity import move_to_relay

        return await move_to_relay(self.messenger, url, insecure_plaintext)

    # -- state --------------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        return self.store is None

    @property
    def relay_connected(self) -> bool:
        return self._relay_connected

    @relay_connected.setter
    def relay_connected(self, up: bool) -> None:
        # Not logged here: the relay link logs its own state, once per change, with the
        # reason (aegisd/transport/relaylink.py RelayLink._state), the one place that does.
        self._relay_connected = up

    async def unlock(self, passphrase: str | None) -> None:
        """Open the store. Argon2id runs in a worker thread: other clients keep being served."""
        async with self.auth:
            key = await asyncio.to_thread(self.keyring.unlock, passphrase)
            # A profile made before the rule (or through the store alone) may have a weak
            # passphrase: it still unlocks, and status/unlock say so.
            self.weak_passphrase = passphrase is not None and is_weak(passphrase)
            if self.store is not None:
                return  # already unlocked; the passphrase was checked all the same
            store = Store.open(self.paths.db, key)
            del key
            self.store = store
            self.events.attach(store)
            self.events.emit("daemon.unlocked", {})
            for hook in self.on_unlock:
                await hook(store)
            log.info("unlocked")

    async def lock(self) -> None:
        async with self.auth:
            await self._close_store()

    async def _close_store(self) -> None:
        store = self.store
        if store is None:
            return
        for hook in reversed(self.on_lock):
            try:
                await hook(store)
            except Exception as exc:  # a failing service must not keep the store open
                log.error("a lock hook failed with %s", type(exc).__name__)
        self.events.emit("daemon.locked", {})
        self.events.detach()
        self.store = None
        store.close()
        droplog.flush()
        log.info("locked")

    def relay_status(self) -> dict[str, Any]:
        """What status reports about the relay. ``connected`` is the relay client's to set."""
        if self.store is None:
            # The relay URL is in the encrypted store: while locked, whether one is configured
            # is unknown (null), not false; and nothing connects.
            return {"configured": None, "connected": False, "url": None, "reason": "locked",
                    "refusing": None}
        url = self.store.get_setting(SETTING_URL)
        reason = None
        if not self.relay_connected:  # Tor not (yet) working says more than "timed out"
            reason = self.connectivity.relay_reason() or self.messenger.mailboxes.relay_reason
        return {
            "configured": url is not None,
            "connected": self.relay_connected,
            "url": url,
            "reason": reason,
            # A relay that is up but full: deposits refused for want of room (they wait).
            "refusing": self.messenger.delivery.relay_refusing,
        }

    def request_stop(self) -> None:
        self._stop.set()

    # -- running ------------------------------------------------------------------------

    def _take_profile_lock(self) -> None:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(
                f"aegisd is already running for the profile in {self.paths.home}"
            ) from None
        self._lock_fd = fd

    def _release_profile_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def run(self, passphrase: str | None = None, *, have_passphrase: bool = False) -> None:
        """Serve until stopped. ``have_passphrase``: unlock with ``passphrase`` first."""
        self._take_profile_lock()
        try:
            if not self.keyring.has_passphrase:
                await self.unlock(None)
            elif have_passphrase:
                try:
                    await self.unlock(passphrase)
                except WrongPassphrase:
                    raise DaemonError("wrong passphrase in the passphrase file") from None
            try:
                # Socket activation (systemd's aegisd.socket): accept on the inherited socket.
                listen_sock = inherited_socket()
            except InheritedSocketError as exc:
                raise DaemonError(str(exc)) from None
            self.server = RpcServer(
                self.registry,
                self.paths.socket,
                app=self,
                on_disconnect=self._on_disconnect,
                sock=listen_sock,
            )
            try:
                await self.server.start()
            except OSError as exc:
                raise DaemonError(f"cannot listen on {self.paths.socket}: {exc.strerror}") from None
            if listen_sock is not None and self.server.address != str(self.paths.socket):
                log.warning(
                    "the inherited socket is not this profile's socket (%s): clients that look "
                    "for the profile will not find it",
                    self.paths.socket,
                )
            with contextlib.suppress(OSError):
                fd = os.open(self.paths.pid, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            if self.test_methods:  # tests: SIGUSR1 writes every task's stack to stderr
                loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
            log.info(
                "listening on %s%s (%s)",
                self.server.address,
                " (inherited)" if listen_sock is not None else "",
                "locked" if self.locked else "unlocked",
            )
            # Type=notify: ready once clients can connect.
            sd_notify(f"READY=1\nSTATUS={'locked' if self.locked else 'unlocked'}")
            await self._stop.wait()
            log.info("stopping")
            sd_notify("STOPPING=1")
        finally:
            await self._shutdown()
            log.info("stopped")

    async def _shutdown(self) -> None:
        if self.server is not None:
            await self.server.close()
        await self.events.close()
        async with self.auth:
            await self._close_store()
        with contextlib.suppress(OSError):
            self.paths.pid.unlink()
        self._release_profile_lock()

    def _on_disconnect(self, conn: Connection) -> None:
        self.events.drop_owner(conn)

    # -- methods ------------------------------------------------------------------------

    def _register_core(self) -> None:
        r = self.registry
        r.register("version", self.rpc_version)
        r.register("status", self.rpc_status)
        r.register("unlock", self.rpc_unlock)
        r.register("lock", self.rpc_lock)
        r.register("passphrase.change", self.rpc_passphrase_change)
        r.register("events.subscribe", self.rpc_events_subscribe, unlocked=True)
        r.register("events.unsubscribe", self.rpc_events_unsubscribe)
        r.register("events.list", self.rpc_events_list, unlocked=True)
        r.register("daemon.stop", self.rpc_daemon_stop)
        r.register("rpc.discover", self.rpc_discover)

    async def rpc_version(self, ctx: CallContext) -> dict[str, Any]:
        return {"version": __version__, "api_version": API_VERSION}

    async def rpc_status(self, ctx: CallContext) -> dict[str, Any]:
        store = self.store
        return {
            "version": __version__,
            "api_version": API_VERSION,
            "pid": os.getpid(),
            "locked": store is None,
            "has_passphrase": self.keyring.has_passphrase,
            "weak_passphrase": self.weak_passphrase,
            "relay": self.relay_status(),
            "network": self.connectivity.status(),
            "last_event_seq": None if store is None else store.last_event_seq(),
            "contacts_failed": None if store is None else self.messenger.contacts.failed(),
            "superseded": self.messenger.loss.superseded(),
            "relay_lost": None if store is None else self.messenger.loss.relay_lost,
            "address_renewed": self.messenger.loss.address_renewed(),
            "relay_move": self.messenger.rotation.move_status(),
            "subscriptions": self.events.count(ctx.connection),
        }

    async def rpc_unlock(self, ctx: CallContext, passphrase: str | None = None) -> dict[str, Any]:
        if self.keyring.has_passphrase and passphrase is None:
            raise InvalidParamsError("passphrase", "is required", reason="missing")
        if passphrase == "":
            raise InvalidParamsError("passphrase", "must not be empty", reason="empty")
        try:
            await self.unlock(passphrase)
        except WrongPassphrase:
            raise E.wrong_passphrase() from None
        except NoPassphrase:
            msg = "this profile has no passphrase: call unlock without one"
            raise E.no_passphrase(msg) from None
        except StoreError as exc:
            raise E.store_error(str(exc)) from None
        return {"locked": False, "weak_passphrase": bool(self.weak_passphrase)}

    async def rpc_lock(self, ctx: CallContext) -> dict[str, Any]:
        if not self.keyring.has_passphrase:
            raise E.no_passphrase(
                "this profile has no passphrase, so it cannot be locked: set one first "
                "(aegis passphrase)"
            )
        await self.lock()
        return {"locked": True}

    async def rpc_passphrase_change(
        self,
        ctx: CallContext,
        old_passphrase: str | None = None,
        new_passphrase: str | None = None,
    ) -> dict[str, Any]:
        """Re-wrap the database key under a new passphrase (or, with null, into the key file)."""
        if self.keyring.has_passphrase and old_passphrase is None:
            raise InvalidParamsError("old_passphrase", "is required", reason="missing")
        if not self.keyring.has_passphrase and old_passphrase is not None:
            raise InvalidParamsError(
                "old_passphrase", "must be null: this profile has no passphrase", reason="value"
            )
        if new_passphrase == "":
            raise InvalidParamsError("new_passphrase", "must not be empty", reason="empty")
        if new_passphrase is None and not self.keyring.has_passphrase:
            raise InvalidParamsError(
                "new_passphrase", "is required: this profile has no passphrase yet", reason="value"
            )
        weak = None if new_passphrase is None else problem(new_passphrase)
        if weak is not None:  # the rule aegis init and backup.export apply
            raise E.weak_passphrase(weak)
        async with self.auth:
            try:
                await asyncio.to_thread(
                    self.keyring.change_passphrase, old_passphrase, new_passphrase
                )
            except WrongPassphrase:
                raise E.wrong_passphrase() from None
            except StoreError as exc:
                raise E.store_error(str(exc)) from None
            self.weak_passphrase = False
        if self.store is not None:
            self.events.emit(
                "profile.passphrase_changed", {"has_passphrase": self.keyring.has_passphrase}
            )
        log.info("passphrase changed")
        return {"has_passphrase": self.keyring.has_passphrase}

    async def rpc_events_subscribe(
        self, ctx: CallContext, types: list[str] | None = None, since: int | None = None
    ) -> dict[str, Any]:
        store = self.store
        assert store is not None
        last = store.last_event_seq()
        _check_patterns(types)
        if since is not None and not 0 <= since <= last:
            raise InvalidParamsError(
                "since", f"must be between 0 and the last sequence number ({last})", last_seq=last
            )
        conn = ctx.connection
        sub = self.events.subscribe(conn, conn.send, types, since)
        conn.after_reply.append(sub.ready.set)  # events only after the subscribe response
        first = store.first_event_seq()
        gap = since is not None and first is not None and since < first - 1
        return {"subscription": sub.id, "last_seq": last, "gap": gap}

    async def rpc_events_unsubscribe(self, ctx: CallContext, subscription: str) -> dict[str, Any]:
        if not self.events.unsubscribe(ctx.connection, subscription):
            raise AppError(
                E.NO_SUCH_SUBSCRIPTION,
                "no_such_subscription",
                "no such subscription on this connection",
            )
        return {"unsubscribed": True}

    async def rpc_events_list(
        self,
        ctx: CallContext,
        since: int = 0,
        limit: int = 100,
        types: list[str] | None = None,
    ) -> dict[str, Any]:
        store = self.store
        assert store is not None
        if not 1 <= limit <= MAX_EVENTS_PAGE:
            raise InvalidParamsError("limit", f"must be between 1 and {MAX_EVENTS_PAGE}")
        if since < 0:
            raise InvalidParamsError("since", "must not be negative")
        _check_patterns(types)
        flt = EventFilter(types)
        out: list[dict[str, Any]] = []
        cursor = since
        while len(out) < limit:
            page = store.events_after(cursor, limit=256)
            if not page:
                break
            for ev in page:
                cursor = ev.seq
                if flt.matches(ev.type):
                    out.append(ev.to_json())
                    if len(out) == limit:
                        break
        return {"events": out, "last_seq": store.last_event_seq(), "next_since": cursor}

    def discover(self) -> dict[str, Any]:
        """The OpenRPC description of the methods this daemon serves now."""
        from .rpc.openrpc import document

        return document(self.registry, version=__version__, api_version=API_VERSION)

    async def rpc_discover(self, ctx: CallContext) -> dict[str, Any]:
        """The OpenRPC document of the methods this daemon serves (docs/openrpc.json)."""
        return self.discover()

    async def rpc_daemon_stop(self, ctx: CallContext) -> dict[str, Any]:
        ctx.connection.after_reply.append(self.request_stop)  # once the response is out
        return {"stopping": True}

    async def rpc_debug_emit(
        self, ctx: CallContext, type: str, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Test plumbing only (aegisd --test-methods): persist and publish an event."""
        if not TYPE_RE.match(type) or not type.startswith("debug."):
            raise InvalidParamsError("type", "must be a dotted lowercase name under debug.")
        ev = self.events.emit(type, data or {})
        return {"seq": ev.seq}


def _dump_tasks() -> None:
    """Test plumbing (--test-methods): where every task waits, to diagnose a hang."""
    import sys

    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def _check_patterns(types: list[str] | None) -> None:
    for i, t in enumerate(types or []):
        if not PATTERN_RE.match(t):
            raise InvalidParamsError(
                "types", f"item {i} is not an event type or pattern like message.*", index=i
            )
