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
from aegisd.services.messenger import own_relay_ok


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
        ("wss://localhost/v1/ws", OWN),
        ("wss://10.0.0.1/v1/ws", OWN),
        ("wss://192.168.1.1/v1/ws", OWN),
        ("wss://172.16.0.1/v1/ws", OWN),
        ("wss://100.64.0.1/v1/ws", OWN),  # shared address space (CGNAT)
        ("wss://169.254.169.254/v1/ws", OWN),  # link-local (cloud metadata)
        ("wss://[::1]/v1/ws", OWN),
        ("wss://[fe80::1]/v1/ws", OWN),
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
