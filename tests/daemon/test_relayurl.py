"""The relay URL policy: wss:// anywhere, ws:// only to loopback unless loudly allowed."""

from __future__ import annotations

import pytest

from aegisd.relayurl import RelayUrlError, check_relay_url


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("wss://relay.example", "wss://relay.example"),
        ("WSS://Relay.Example:443/aegis", "wss://relay.example:443/aegis"),
        ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765"),
        ("ws://127.3.4.5/x", "ws://127.3.4.5/x"),
        ("ws://localhost:1", "ws://localhost:1"),
        ("ws://[::1]:9000/", "ws://[::1]:9000/"),
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
    assert check_relay_url("ws://relay.example", insecure_plaintext=True) == "ws://relay.example"
