"""The relay URL policy: wss:// anywhere, ws:// only to loopback unless loudly allowed."""

from __future__ import annotations

import pytest

from aegisd.relayurl import RelayUrlError, check_relay_url, relay_endpoint


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
