"""How the profile reaches its relays: the network mode, the managed Tor, and the settings
and methods around them (``network.get``, ``network.set``, ``relay.set``; docs/api.md).

The managed Tor runs while the profile is unlocked and its mode is ``tor``; the relay link is
restarted whenever a setting it depends on changes. Nothing here logs an address or a URL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aegisd.netmode import (
    MAX_TRUSTED_RELAYS,
    MODES,
    SETTING_BRIDGES,
    SETTING_ISOLATION,
    SETTING_MODE,
    SETTING_PROXY,
    SETTING_TOR_PATH,
    SETTING_TRUSTED_RELAYS,
    NeedsTor,
    check_mode_for_relay,
    effective_mode,
    find_obfs4,
    find_tor,
    own_extra,
    tor_missing_message,
)
from aegisd.relayurl import (
    SETTING_INSECURE,
    SETTING_URL,
    RelayUrlError,
    check_chosen_relay_url,
    check_relay_url,
    endpoint_key,
    same_relay,
)
from aegisd.rpc import AppError, CallContext, InvalidParamsError, Registry
from aegisd.rpc.methods import Handler
from aegisd.store import Store
from aegisd.transport.network import Network, ProxyUrlError, check_proxy_url
from aegisd.transport.tor import (
    MAX_BRIDGES,
    ManagedTor,
    TorConfig,
    TorConfigError,
    TorStatus,
    check_bridge_line,
    check_tor_path,
)

if TYPE_CHECKING:
    from .context import ServiceContext
    from .messenger import Messenger

log = logging.getLogger("aegisd.network")

#: Test networks only: a file of torrc lines appended to the managed Tor's configuration,
#: honoured only by a daemon started with --test-methods (tests/tornet.py writes it).
TEST_TORRC_ENV = "AEGISD_TOR_EXTRA_TORRC"
TOR_DIR = "tor"

E_NO_TOR = 1012  # docs/api.md "Errors": mode tor, and no tor program


class Connectivity:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.tor: ManagedTor | None = None
        self._tor_config: TorConfig | None = None
        self._test_lines: tuple[str, ...] = ()
        path = os.environ.get(TEST_TORRC_ENV) if ctx.test_methods else None
        if path:
            lines = Path(path).read_text().splitlines()
            self._test_lines = tuple(line for line in lines if line.strip())

    # --- settings ---------------------------------------------------------------------------

    def _store(self) -> Store:
        store = self.ctx.store
        if store is None:
            raise RuntimeError("store is locked")
        return store

    def mode(self) -> str:
        store = self._store()
        return effective_mode(
            store.get_setting(SETTING_MODE),
            store.get_setting(SETTING_PROXY),
            store.get_setting(SETTING_URL),
        )

    def network(self) -> Network:
        store = self._store()
        return Network.from_settings(
            store.get_setting(SETTING_PROXY),
            store.get_setting(SETTING_ISOLATION),
            store.get_setting(SETTING_MODE),
            store.get_setting(SETTING_URL),
            self.tor,
            # The old relay of a move under way is the user's own too (still drained), and so
            # are the relays the user trusts (network.trusted_relays).
            also_own=own_extra(store),
        )

    def _wanted_tor(self) -> TorConfig | None:
        store = self.ctx.store
        if store is None or self.mode() != "tor" or not store.get_setting(SETTING_URL):
            return None  # locked, another mode, or no relay yet: no Tor to run
        bridges = tuple(store.get_setting(SETTING_BRIDGES) or ())
        return TorConfig(
            data_dir=self.ctx.paths.home / TOR_DIR,
            tor_path=store.get_setting(SETTING_TOR_PATH),
            bridges=bridges,
            obfs4=find_obfs4() if bridges else None,
            extra_lines=self._test_lines,
        )

    # --- life cycle ---------------------------------------------------------------------------

    async def on_unlock(self, store: Store) -> None:
        await self._apply_tor()

    async def on_lock(self, store: Store) -> None:
        await self._stop_tor()

    async def _apply_tor(self) -> None:
        """Start, restart or stop the managed Tor to match the settings. Callers hold the
        daemon's lock (unlock, lock, reconfigure), so two never run at once."""
        wanted = self._wanted_tor()
        if wanted == self._tor_config and (wanted is None) == (self.tor is None):
            return
        await self._stop_tor()
        if wanted is not None:
            tor = ManagedTor(wanted)
            tor.on_change = functools.partial(self._on_tor, tor)
            self._tor_config, self.tor = wanted, tor
            tor.start()

    async def _stop_tor(self) -> None:
        tor, self.tor, self._tor_config = self.tor, None, None
        if tor is not None:
            await tor.stop()

    async def reconfigure(self) -> None:
        """After a change of the network or relay settings: Tor, then every connection. Under
        the daemon's lock: a lock (or another change) waits until this one is done, so no
        Tor or link is left running for a locked profile."""
        async with self.ctx.auth:
            if self.ctx.store is None:
                return  # locked meanwhile: the next unlock starts what the settings say
            await self._apply_tor()
            await self.ctx.restart_links()

    def _on_tor(self, tor: ManagedTor, old: TorStatus, new: TorStatus) -> None:
        if tor is not self.tor or self.ctx.store is None:
            return  # a Tor being replaced or stopped: its news is not the profile's
        emit = self.ctx.events.emit
        if new.state in ("bootstrapping", "ready") and (
            new.progress != old.progress or old.state not in ("bootstrapping", "ready")
        ):
            emit("tor.bootstrap", {"progress": new.progress, "tag": new.tag,
                                   "summary": new.summary})  # fmt: skip
        elif new.state in ("restarting", "failed") and new.failures != old.failures:
            emit("tor.failed", {"reason": new.reason, "failures": new.failures,
                                "retry_in": new.retry_in})  # fmt: skip

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``status.network``: the mode and, in mode tor, what the managed Tor is doing."""
        if self.ctx.store is None:
            return {"mode": None, "tor": None}
        tor = self.tor.status.to_json() if self.tor is not None else None
        return {"mode": self.mode(), "tor": tor}

    def relay_reason(self) -> str | None:
        """Why relays cannot be reached when the cause is Tor, else None."""
        if self.tor is not None and not self.tor.ready.is_set():
            return self.tor.status.describe()
        return None

    def settings_json(self) -> dict[str, Any]:
        store = self._store()
        net = self.network()
        return {
            "mode": net.mode,
            "mode_chosen": net.chosen,
            "proxy": store.get_setting(SETTING_PROXY),
            "isolation": net.isolation,
            "bridges": list(store.get_setting(SETTING_BRIDGES) or []),
            "tor_path": store.get_setting(SETTING_TOR_PATH),
            "trusted_relays": list(store.get_setting(SETTING_TRUSTED_RELAYS) or []),
            "tor": self.tor.status.to_json() if self.tor is not None else None,
        }


def register(registry: Registry, conn: Connectivity) -> None:
    def method(name: str) -> Callable[[Handler], Handler]:
        return registry.method(name, unlocked=True)  # "unlocked": needs an unlocked profile

    @method("network.get")
    async def network_get(ctx: CallContext) -> dict[str, Any]:
        return conn.settings_json()

    @method("network.set")
    async def network_set(
        ctx: CallContext,
        mode: str | None = None,
        proxy: str | None = None,
        isolation: bool | None = None,
        bridges: list[str] | None = None,
        tor_path: str | None = None,
        trusted_relays: list[str] | None = None,
    ) -> dict[str, Any]:
        store = conn._store()
        if trusted_relays is not None:
            if (not isinstance(trusted_relays, list)
                    or len(trusted_relays) > MAX_TRUSTED_RELAYS):
                raise InvalidParamsError(
                    "trusted_relays", f"must be a list of at most {MAX_TRUSTED_RELAYS} relay URLs")
            trusted = []
            for i, u in enumerate(trusted_relays):
                try:
                    trusted.append(check_relay_url(str(u), insecure_plaintext=True))
                except RelayUrlError as exc:
                    raise InvalidParamsError("trusted_relays", f"item {i}: {exc}",
                                             index=i) from None
            trusted_relays = trusted
        if mode is not None and mode not in MODES:
            raise InvalidParamsError("mode", "must be tor, proxy or direct")
        if isolation is not None and not isinstance(isolation, bool):
            raise InvalidParamsError("isolation", "must be true or false")
        if proxy not in (None, ""):
            try:
                proxy = check_proxy_url(str(proxy))
            except ProxyUrlError as exc:
                raise InvalidParamsError("proxy", str(exc)) from None
        if bridges is not None:
            if not isinstance(bridges, list) or len(bridges) > MAX_BRIDGES:
                raise InvalidParamsError("bridges", f"must be a list of at most {MAX_BRIDGES}")
            checked = []
            for i, line in enumerate(bridges):
                try:
                    checked.append(check_bridge_line(str(line)))
                except TorConfigError as exc:
                    raise InvalidParamsError("bridges", f"item {i}: {exc}", index=i) from None
            if any(b.startswith("obfs4 ") for b in checked) and find_obfs4() is None:
                raise InvalidParamsError(
                    "bridges", "obfs4 bridges need obfs4proxy: install it (apt install obfs4proxy)"
                )
            bridges = checked
        if tor_path not in (None, ""):
            try:
                tor_path = check_tor_path(str(tor_path))
            except TorConfigError as exc:
                raise InvalidParamsError("tor_path", str(exc)) from None
        new_proxy = store.get_setting(SETTING_PROXY) if proxy is None else (proxy or None)
        new_mode = mode or effective_mode(store.get_setting(SETTING_MODE), new_proxy,
                                          store.get_setting(SETTING_URL))  # fmt: skip
        if mode is None and proxy:  # a proxy given alone means: use it
            new_mode = "proxy"
        if new_mode == "proxy" and not new_proxy:
            raise InvalidParamsError("proxy", "mode proxy needs a proxy: socks5://HOST:PORT")
        try:
            check_mode_for_relay(new_mode, store.get_setting(SETTING_URL))
        except NeedsTor as exc:
            raise InvalidParamsError("mode", str(exc)) from None
        if new_mode == "tor":
            path = tor_path if tor_path is not None else store.get_setting(SETTING_TOR_PATH)
            if find_tor(path or None) is None:
                raise AppError(E_NO_TOR, "no_tor", tor_missing_message())
        with store.transaction():
            if mode is not None or proxy:
                store.set_setting(SETTING_MODE, new_mode)
            if proxy is not None:
                store.set_setting(SETTING_PROXY, proxy or None)
            if isolation is not None:
                store.set_setting(SETTING_ISOLATION, isolation)
            if bridges is not None:
                store.set_setting(SETTING_BRIDGES, bridges or None)
            if tor_path is not None:
                store.set_setting(SETTING_TOR_PATH, tor_path or None)
            if trusted_relays is not None:
                store.set_setting(SETTING_TRUSTED_RELAYS, trusted_relays or None)
        log.info("network settings changed (mode %s)", new_mode)
        await conn.reconfigure()
        return conn.settings_json()

    @method("relay.set")
    async def relay_set(
        ctx: CallContext, url: str, insecure_plaintext: bool = False
    ) -> dict[str, Any]:
        store = conn._store()
        try:
            url = check_chosen_relay_url(url, insecure_plaintext=insecure_plaintext)
        except RelayUrlError as exc:
            raise InvalidParamsError("url", str(exc)) from None
        mode = effective_mode(store.get_setting(SETTING_MODE), store.get_setting(SETTING_PROXY),
                              url)  # fmt: skip
        try:
            check_mode_for_relay(mode, url)
        except NeedsTor as exc:
            raise InvalidParamsError("url", str(exc)) from None
        if mode == "tor" and find_tor(store.get_setting(SETTING_TOR_PATH)) is None:
            raise AppError(E_NO_TOR, "no_tor", tor_missing_message())
        revoked, moving = await conn.ctx.move_relay(url, bool(insecure_plaintext))
        await conn.reconfigure()
        return {"url": url, "mode": mode, "invitations_revoked": revoked,
                "contacts_moving": moving}  # fmt: skip


DELETE_TIMEOUT = 30.0  # seconds to delete one old mailbox at the old relay


async def move_to_relay(m: Messenger, url: str, insecure_plaintext: bool) -> tuple[int, int]:
    """Point the profile at another relay. Its address, invitation and pool mailboxes are
    deleted at the old relay now, through the network settings in force (or, if that relay
    cannot be reached, retired: deleted once it can, as after a backup import), and new ones
    are made at the new relay on the next connection. The contacts' mailboxes move by the
    ordinary rotation (rotation.py continue_move): the old ones keep receiving until each
    contact confirms its new one. Returns the number of invitations that stop working and of
    contacts whose mailboxes move.

    A deliberate user action: it also clears the mark of a copy restored elsewhere (or of a
    relay that lost the mailboxes), since the new mailboxes are this copy's own."""
    from .mailbox import OwnedMailbox
    from .mailbox_loss import SETTING_SUPERSEDED
    from .mailboxes import SETTING_MOVE

    async with m.lock:
        store = m.store
        old_url = store.get_setting(SETTING_URL)
        old_insecure = bool(store.get_setting(SETTING_INSECURE, False))
        was_superseded = bool(store.get_setting(SETTING_SUPERSEDED))
        moving = len({r.contact_id for r in store.list_mailboxes("contact")
                      if r.contact_id is not None and not same_relay(
                          OwnedMailbox.from_bytes(r.descriptor).relay_url, url)})  # fmt: skip
        from aegisd.store import cover as pool

        rows = [r for r in [*store.list_mailboxes(), *pool.pool_rows(store)]
                if r.role != "contact"]  # fmt: skip
        # Out of use first (as Mailboxes.retire does): a reconnect while they are deleted must
        # not subscribe them again (the relay would refuse a deleted mailbox).
        for row in rows:
            m.mailboxes.owned.pop(OwnedMailbox.from_bytes(row.descriptor).owner_id, None)
        deleted = set()
        for row in rows:  # now, while the old relay's network settings still hold
            try:
                mb = OwnedMailbox.from_bytes(row.descriptor)
                if await asyncio.wait_for(m.renewals.relay_delete(mb), DELETE_TIMEOUT) != "away":
                    deleted.add(row.id)  # a URL the policy refuses counts as done here
            except TimeoutError:
                pass
        with store.transaction():
            for row in rows:
                if row.id not in deleted:
                    store._q(
                        "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (NULL, ?)",
                        (row.descriptor,),
                    )
                if row.role == pool.POOL_ROLE:
                    pool.pool_remove(store, row.id)
                else:
                    store.delete_mailbox(row.id)
            store.set_setting(SETTING_URL, url)
            store.set_setting(SETTING_INSECURE, bool(insecure_plaintext))
            store.set_setting(SETTING_SUPERSEDED, None)
            if moving and not same_relay(old_url, url):
                move = store.get_setting(SETTING_MOVE) or {}  # a move under way keeps its start
                store.set_setting(SETTING_MOVE, {
                    "from": move.get("from", old_url), "at": move.get("at", _ms()),
                    "insecure": move_insecure(move, old_url, old_insecure)})  # fmt: skip
        m.mailboxes.reload()
        m.loss.relay_lost = None
        m.loss.denied.clear()
        if was_superseded:
            m.cover.start()  # stopped when the mark was set (_mark_superseded)
    log.info("relay changed")
    return sum(1 for row in rows if row.role == "invitation"), moving


def move_insecure(move: dict[str, Any], old_url: str | None, old_insecure: bool) -> list[str]:
    """The relays of a move under way that were set with --insecure-plaintext-relay (their
    endpoints): the old mailboxes there are still drained and deleted over ws://, though the
    profile's own flag now belongs to the new relay."""
    insecure = set(move.get("insecure") or [])
    if old_insecure and old_url:
        insecure.add(endpoint_key(old_url))
    return sorted(insecure)


def _ms() -> int:
    return time.time_ns() // 1_000_000
