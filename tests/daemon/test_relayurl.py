"""The relay URL policy: wss:// anywhere, ws:// only to loopback unless loudly allowed."""

from __future__ import annotations

import pytest

from aegisd.relayurl import (
    RelayUrlError,
    check_relay_url,
    endpoint_key,
    relay_endpoint,
    same_relay,
)
from aegisd.services.connectivity import move_insecure
from aegisd.services.mailboxes import own_relay_ok


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        # No path (or "/") means the relay's endpoint, /v1/ws; another path is kept.
        ("wss://relay.example", "wss://relay.example/v1/ws"),
        ("WSS://Relay.Example:443/aegis", "wss://relay.example:443/aegis"),
        ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765/v1/ws"),
        ("ws://127.0.0.1:8765/v1/ws", "ws://127.0.0.1:8765/v1/ws"),
        ("ws://127.3.4.5/x", "ws://127.3.4.5/x"),
        ("ws://localhost:1", "ws://localhost:1/v1/ws"),
        ("ws://[::1]:9000/", "ws://[::1]:9000/v1/ws"),
    ],
)
def test_accepted(url, normalised):
    assert check_relay_url(url) == normalised


@pytest.mark.parametrize(
    "url",
    [
        "ws://relay.example",
        "ws://10.0.0.1",
        "ws://[::2]",
        "http://relay.example",
        "relay.example",
        "wss://",
        "wss://user:pw@relay.example",
        "wss://relay.example/?token=1",
        "wss://relay.example/#x",
        "wss://relay.example:99999",
    ],
)
def test_refused(url):
    with pytest.raises(RelayUrlError):
        check_relay_url(url)


def test_plaintext_to_another_host_needs_the_loud_option():
    assert (check_relay_url("ws://relay.example", insecure_plaintext=True)
            == "ws://relay.example/v1/ws")


@pytest.mark.parametrize(
    ("stored", "endpoint"),
    [
        ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765/v1/ws"),
        ("ws://[::1]:8765/", "ws://[::1]:8765/v1/ws"),
        ("wss://relay.example/v1/ws", "wss://relay.example/v1/ws"),
        ("wss://relay.example/aegis", "wss://relay.example/aegis"),
    ],
)
def test_a_url_stored_without_path_is_dialled_at_the_relay_endpoint(stored, endpoint):
    assert relay_endpoint(stored) == endpoint


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("ws://127.0.0.1:8765/ws", False),  # a newcomer's typo: the relay would answer 404
        ("wss://relay.example/aegis", False),
        ("wss://relay.example/v1/wss", False),
        ("wss://relay.example", True),
        ("wss://relay.example/v1/ws", True),
        ("wss://relay.example/chat/v1/ws", True),  # behind a proxy that adds a prefix
    ],
)
def test_a_chosen_relay_url_has_the_relays_path(url, ok):
    """init and relay.set hold what the user types to the relay's path; links from others
    only to check_relay_url."""
    from aegisd.relayurl import check_chosen_relay_url

    if ok:
        assert check_chosen_relay_url(url).endswith("/v1/ws")
    else:
        with pytest.raises(RelayUrlError, match="must end in /v1/ws"):
            check_chosen_relay_url(url)
        check_relay_url(url)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765/v1/ws", True),
        ("ws://127.0.0.1:8765/", "ws://127.0.0.1:8765/v1/ws", True),
        ("WSS://Relay.Example/v1/ws", "wss://relay.example", True),
        ("wss://relay.example/aegis", "wss://relay.example", False),
        ("ws://127.0.0.1:8765", "ws://127.0.0.1:8766", False),
        ("ws://relay.example", "wss://relay.example", False),
        ("ws://127.0.0.1:1", None, False),
    ],
)
def test_same_relay_compares_endpoints(a, b, same):
    """Finding 7: equivalent URLs (with or without /v1/ws) are one relay everywhere."""
    assert same_relay(a, b) is same
    assert same_relay(b, a) is same
    if b is not None:
        assert (endpoint_key(a) == endpoint_key(b)) is same


def test_the_old_insecure_relay_of_a_move_stays_reachable():
    """Finding 3: a move away from a --insecure-plaintext-relay relay keeps that relay's flag
    for its old mailboxes (drains, deletes); nothing else plaintext gets through."""
    old = "ws://relay.example:8765"
    move = {"from": old, "at": 1, "insecure": move_insecure({}, old, True)}
    assert move["insecure"] == ["ws://relay.example:8765/v1/ws"]
    assert own_relay_ok(old, False, move)
    assert own_relay_ok("ws://relay.example:8765/v1/ws", False, move)
    assert not own_relay_ok(old, False, None)  # before: the old relay was never dialled again
    assert not own_relay_ok("ws://other.example:8765", False, move)
    assert not own_relay_ok(old, False, {"from": old, "at": 1, "insecure": move_insecure(
        {}, old, False)})  # fmt: skip
    # A second move keeps the first one's insecure relay.
    again = move_insecure(move, "wss://relay2.example", False)
    assert again == ["ws://relay.example:8765/v1/ws"]


# --- relay URLs chosen by someone else (issue 15 item 10) ---------------------------------------

OWN = "ws://127.0.0.1:8765/v1/ws"
ONION = "ws://" + "a" * 56 + ".onion/v1/ws"


@pytest.mark.parametrize(
    "url",
    [
        "wss://relay.example.org/v1/ws",
        "wss://93.184.216.34:443/v1/ws",
        "wss://[2606:4700::1111]/v1/ws",
        ONION,
        "ws://127.0.0.1:9999/v1/ws",  # the own relay's host (a local relay the user chose)
        "wss://127.0.0.1:9999/v1/ws",
        # every loopback spelling is the own relay's host (review, 8)
        "ws://localhost:8765/v1/ws",
        "ws://[::1]:8765/v1/ws",
        "ws://[::ffff:127.0.0.1]:8765/v1/ws",
        "wss://[64:ff9b::808:808]/v1/ws",  # NAT64 of a public address
    ],
)
def test_peer_urls_allowed(url: str) -> None:
    from aegisd.relayurl import check_peer_relay_url

    assert check_peer_relay_url(url, OWN)


@pytest.mark.parametrize(
    ("url", "own"),
    [
        ("ws://127.0.0.2:1/v1/ws", OWN),  # loopback, not the own relay's host
        ("wss://127.0.0.2:1/v1/ws", OWN),
        ("wss://localhost/v1/ws", "wss://relay.example.org/v1/ws"),
        ("wss://[::1]/v1/ws", "wss://relay.example.org/v1/ws"),
        ("wss://10.0.0.1/v1/ws", OWN),
        ("wss://192.168.1.1/v1/ws", OWN),
        ("wss://172.16.0.1/v1/ws", OWN),
        ("wss://100.64.0.1/v1/ws", OWN),  # shared address space (CGNAT)
        ("wss://169.254.169.254/v1/ws", OWN),  # link-local (cloud metadata)
        ("wss://[fe80::1]/v1/ws", OWN),
        # IPv6 forms that embed an IPv4 loopback or private address (issue 15 review, 5)
        ("wss://[::127.0.0.1]/v1/ws", OWN),
        ("wss://[::ffff:0:7f00:1]/v1/ws", OWN),
        ("wss://[64:ff9b::a00:1]/v1/ws", OWN),
        ("wss://[2002:7f00:1::]/v1/ws", OWN),
        ("wss://[64:ff9b:1::808:808]/v1/ws", OWN),  # local-use NAT64: refused outright
        ("wss://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/v1/ws", OWN),  # Teredo
        # names checked as they are dialled: IDNA-mapped, numeric forms (review, 6)
        ("wss://x.\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/v1/ws", OWN),
        ("wss://127.0.0.0x1/v1/ws", OWN),
        ("wss://1.2.3.0x4/v1/ws", OWN),
        ("wss://0x7f.0.0.1/v1/ws", OWN),
        ("wss://relay.0x10/v1/ws", OWN),
        ("wss://[fd00::1]/v1/ws", OWN),
        ("wss://[::ffff:10.0.0.1]/v1/ws", OWN),
        ("wss://0.0.0.0/v1/ws", OWN),
        ("wss://224.0.0.1/v1/ws", OWN),
        ("wss://127.1/v1/ws", OWN),  # a legacy form of 127.0.0.1
        ("wss://2130706433/v1/ws", OWN),
        ("wss://router/v1/ws", OWN),  # not a public DNS name
        ("wss://nas.local/v1/ws", OWN),
        ("wss://x.internal/v1/ws", OWN),
        ("ws://relay.example.org/v1/ws", OWN),  # plaintext to a host that is not ours
        ("ws://127.0.0.1:1/v1/ws", "wss://127.0.0.1/v1/ws"),  # ours is wss: so must theirs be
        ("wss://127.0.0.1:1/v1/ws", None),  # no relay of our own
        ("wss://user@relay.example.org/v1/ws", OWN),
    ],
)
def test_peer_urls_refused(url: str, own: str | None) -> None:
    from aegisd.relayurl import check_peer_relay_url

    with pytest.raises(RelayUrlError):
        check_peer_relay_url(url, own)


def test_a_peer_name_is_dialled_to_public_addresses_only() -> None:
    """Directly, the connection to a relay a contact chose goes to what PublicResolver kept:
    a name that resolves to loopback (localhost, here) is refused before any connection."""
    import asyncio

    from aegisd.transport.network import Network, PublicResolver

    async def go() -> None:
        with pytest.raises(OSError):
            await PublicResolver().resolve("localhost", 443)
        net = Network.from_settings(None, None, "direct", OWN)
        peer = net.connector("wss://relay.example.org/v1/ws")
        own = net.connector(OWN)
        try:
            assert isinstance(peer._resolver, PublicResolver)  # type: ignore[attr-defined]
            assert not isinstance(own._resolver, PublicResolver)  # type: ignore[attr-defined]
        finally:
            await peer.close()
            await own.close()

    asyncio.run(go())


def test_the_old_relay_of_a_move_counts_as_own() -> None:
    """check_peer_relay_url takes every own relay (the relay, and the one a move left), as
    Network.own_hosts does (review, 8)."""
    from aegisd.relayurl import check_peer_relay_url

    peer = "ws://10.1.2.3:8765/v1/ws"
    with pytest.raises(RelayUrlError):
        check_peer_relay_url(peer, "wss://relay.example.org/v1/ws")
    assert check_peer_relay_url(peer, ["wss://relay.example.org/v1/ws", "ws://10.1.2.3:1/v1/ws"])
    own = "ws://localhost:8765/v1/ws"
    assert check_peer_relay_url("ws://127.0.0.1:8765/v1/ws", own)
    assert check_peer_relay_url("ws://[::1]:8765/v1/ws", own)


class _Hostile:
    """Two loopback HTTP servers: ``front`` answers every request with 302 to ``secret``,
    which counts the requests it gets (a service of the user's machine)."""

    def __init__(self) -> None:
        self.hits = 0

    async def __aenter__(self) -> _Hostile:
        from aiohttp import web

        async def secret(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text="local secret")

        back = web.Application()
        back.router.add_get("/secret", secret)
        self._back = web.AppRunner(back)
        await self._back.setup()
        site = web.TCPSite(self._back, "127.0.0.1", 0)
        await site.start()
        self.secret_port = self._back.addresses[0][1]

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"http://127.0.0.1:{self.secret_port}/secret")

        front = web.Application()
        front.router.add_get("/{tail:.*}", redirect)
        self._front = web.AppRunner(front)
        await self._front.setup()
        site = web.TCPSite(self._front, "127.0.0.1", 0)
        await site.start()
        self.front_port = self._front.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._front.cleanup()
        await self._back.cleanup()


def test_a_redirect_is_never_followed() -> None:
    """A server that answers the upgrade with 302 to a local port: the relay client refuses
    the redirect (HandshakeFailed) and the local port sees nothing (review, 1)."""
    import asyncio

    from relay.client import HandshakeFailed, RelayClient

    async def go() -> None:
        async with _Hostile() as h:
            with pytest.raises(HandshakeFailed) as err:
                await RelayClient.connect(f"ws://127.0.0.1:{h.front_port}/v1/ws")
            assert err.value.status == 302
            assert h.hits == 0

    asyncio.run(go())


def test_a_peer_connection_to_a_private_literal_is_refused_by_the_connector() -> None:
    """aiohttp never gives an IP literal to the resolver: the connector for a relay someone
    else chose checks literals itself, for whatever URL reaches it (review, 1)."""
    import asyncio

    from aegisd.transport.network import Network
    from relay.client import RelayClient

    async def go() -> None:
        async with _Hostile() as h:
            net = Network.from_settings(None, None, "direct", "wss://relay.example.org/v1/ws")
            url = f"ws://127.0.0.1:{h.secret_port}/secret"
            with pytest.raises(OSError):
                await RelayClient.connect(url, connector=net.connector(url))
            assert h.hits == 0

    asyncio.run(go())


def test_a_stored_peer_url_is_checked_at_every_connection() -> None:
    """with_relay holds every relay that is not the user's own to the peer policy, also a
    URL stored before it existed (ws://127.0.0.1:6379 with an own relay elsewhere): refused
    before any connection (review, 2)."""
    import asyncio

    from aegisd.transport.network import Network
    from aegisd.transport.relaylink import RelayRefused, with_relay

    async def go() -> None:
        async with _Hostile() as h:
            net = Network.from_settings(None, None, "direct", "wss://relay.example.org/v1/ws")
            with pytest.raises(RelayRefused):
                await with_relay(f"ws://127.0.0.1:{h.secret_port}/secret", None, net)
            assert h.hits == 0

    asyncio.run(go())


def test_a_peer_name_resolving_to_loopback_is_not_connected_to() -> None:
    """DNS rebinding through an actual connection: a name someone else chose that resolves to
    loopback (``localhost`` stands in for it) is dialled through PublicResolver and fails
    before anything reaches the local port."""
    import asyncio

    import aiohttp

    from aegisd.transport.network import Network
    from relay.client import RelayClient

    async def go() -> None:
        async with _Hostile() as h:
            net = Network.from_settings(None, None, "direct", "wss://relay.example.org/v1/ws")
            url = f"ws://localhost:{h.secret_port}/secret"
            with pytest.raises((OSError, aiohttp.ClientError)):
                await RelayClient.connect(url, connector=net.connector(url))
            assert h.hits == 0

    asyncio.run(go())
