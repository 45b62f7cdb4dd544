"""Which connections each network mode may make (aegisd/transport/network.py): nothing but an
explicit (or, for loopback, default) direct mode ever connects without Tor or the proxy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp_socks import ProxyConnector

from aegisd.netmode import NeedsChoice, NeedsTor
from aegisd.transport.network import Network, ProxyUnavailable
from aegisd.transport.relaylink import RelayLink, RelayUnavailable, with_relay
from aegisd.transport.tor import ManagedTor, TorConfig, TorUnavailable

ONION = "ws://" + "c" * 56 + ".onion/v1/ws"
LOCAL = "ws://127.0.0.1:9/v1/ws"
REMOTE = "wss://relay.example.org/v1/ws"


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_default_mode_of_a_local_relay_reaches_loopback_only() -> None:
    net = Network.from_settings(None, None, None, LOCAL)
    assert (net.mode, net.chosen, net.isolation) == ("direct", False, False)
    net.check(LOCAL)
    with pytest.raises(NeedsChoice):  # a contact's relay elsewhere: neither Tor nor direct
        net.check(REMOTE)
    with pytest.raises(NeedsTor):
        net.check(ONION)
    chosen = Network.from_settings(None, None, "direct", LOCAL)
    chosen.check(REMOTE)  # the user chose direct: the relay sees the address, knowingly
    with pytest.raises(NeedsTor):
        chosen.check(ONION)


def test_tor_mode_without_a_ready_tor_never_gives_a_direct_connector() -> None:
    async def go() -> None:
        tor = ManagedTor(TorConfig(Path("/tmp/never-started")))
        net = Network.from_settings(None, None, "tor", REMOTE, tor)
        assert net.mode == "tor" and net.isolation
        with pytest.raises(TorUnavailable):
            net.connector()
        with pytest.raises(TorUnavailable):  # waits for the bootstrap, then says why not
            await tor.wait_ready(0.05)
        tor.socks = ("127.0.0.1", 9050)
        tor.ready.set()
        conn = net.connector()
        assert isinstance(conn, ProxyConnector)
        await conn.close()
        no_tor = Network(mode="tor")
        with pytest.raises(TorUnavailable):
            no_tor.connector()

    _run(go())


def test_proxy_mode_without_a_proxy_and_unknown_modes_fail_closed() -> None:
    async def go() -> None:
        with pytest.raises(ProxyUnavailable):
            Network(mode="proxy").connector()
        with pytest.raises(ProxyUnavailable):
            Network(mode="bogus").connector()
        direct = Network(mode="direct").connector()
        assert isinstance(direct, aiohttp.TCPConnector)
        await direct.close()

    _run(go())


def test_with_relay_refuses_a_link_whose_settings_are_being_replaced() -> None:
    """A deposit during a settings change never uses the old settings' connection."""

    async def go() -> None:
        old = Network.from_settings(None, None, "direct", LOCAL)
        new = Network.from_settings("socks5://127.0.0.1:1", None, "proxy", LOCAL)

        async def handler(*_: object) -> None: ...

        link = RelayLink(LOCAL, handler=handler, subscriptions=list, on_state=lambda *_: None,
                         network=old)  # fmt: skip
        with pytest.raises(RelayUnavailable):
            await with_relay(LOCAL, link, new)
        await link.stop()
        with pytest.raises(RelayUnavailable):
            await with_relay(LOCAL, link, old)

    _run(go())
