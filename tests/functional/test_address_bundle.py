"""A published address under a drainer (issue 15, item 7), with real daemons and a real relay.

Anyone holding the link may take the address's one-time prekeys: first contacts then use the
last-resort key and still work, the owner's daemon tops the relay up right after a first
contact, and a fetch the relay limits is reported as a limit ("try again later"), not as "the
relay has no contact address"."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aegis_client.errors import RpcError
from aegisd.core import wire
from relay.client import RelayClient
from tests.functional.conftest import Peer
from tests.relay.conftest import RelayProcess


@pytest.fixture
def relay_with(tmp_short: Path) -> Iterator[Callable[..., RelayProcess]]:
    made: list[RelayProcess] = []

    def make(**options: str) -> RelayProcess:
        sub = tmp_short / f"relay{len(made)}"
        sub.mkdir()
        rp = RelayProcess(sub, {"--" + k.replace("_", "-"): v for k, v in options.items()})
        made.append(rp)
        rp.start()
        return rp

    try:
        yield make
    finally:
        for rp in made:
            rp.close()


@pytest.fixture
def people(tmp_short: Path) -> Iterator[Callable[[RelayProcess, str], Peer]]:
    made: list[Peer] = []

    def make(relay: RelayProcess, name: str) -> Peer:
        p = Peer(tmp_short / name, f"ws://127.0.0.1:{relay.port}/v1/ws", name)
        made.append(p)
        p.wait_connected()
        return p

    try:
        yield make
    finally:
        for p in made:
            p.stop()


def drain(relay: RelayProcess, link: str, fetches: int) -> list[bool]:
    """Fetch the address's bundle `fetches` times, as anyone holding the link may: whether
    each answer carried one-time items."""
    address = wire.ContactLink.from_text(link).bundle_address

    async def go() -> list[bool]:
        c = await RelayClient.connect(relay.url)
        try:
            got = [await c.bundle_fetch(address) for _ in range(fetches)]
        finally:
            await c.close()
        return [x is not None and m is not None for _, x, m in got]

    return asyncio.run(go())


def test_drained_address_still_works_and_is_topped_up(
    relay_with: Callable[..., RelayProcess], people: Callable[[RelayProcess, str], Peer]
) -> None:
    relay = relay_with(bundle_fetch_burst="100", bundle_fetch_rate="0.0001")
    bob, carol = people(relay, "bob"), people(relay, "carol")
    link = bob.call("address.get")["link"]
    # Every one-time key the relay holds for bob's address is taken.
    taken = drain(relay, link, 60)
    assert taken[-1] is False and taken.count(True) >= 50
    # A first contact now uses the last-resort key: it works all the same.
    carol.call("contacts.add", {"name": "bob", "link": link})
    request = bob.wait_for(lambda: bob.call("requests.list")["requests"], "carol's request")
    bob.call("requests.accept", {"request": request[0]["request"]})
    carol.wait_for(lambda: carol.call("contacts.list")["contacts"][0]["established"],
                   "bob's answer")  # fmt: skip
    # And bob's daemon topped the relay up after that first contact, not an hour later.
    bob.wait_for(lambda: drain(relay, link, 1) == [True], "one-time keys at the relay again")


def test_a_limit_is_reported_as_a_limit(
    relay_with: Callable[..., RelayProcess], people: Callable[[RelayProcess, str], Peer]
) -> None:
    # One bundle fetch per connection: alice's second contact is fetched on a connection of
    # its own (her relay connection has made its one fetch).
    relay = relay_with(bundle_fetches_per_connection="1")
    alice, bob, carol = people(relay, "alice"), people(relay, "bob"), people(relay, "carol")
    for who in (bob, carol):
        alice.call("contacts.add", {"name": who.name, "link": who.call("address.get")["link"]})
    assert {c["name"] for c in alice.call("contacts.list")["contacts"]} == {"bob", "carol"}
    # A relay that refuses every fetch for now: "try again later", not "no such address".
    strict = relay_with(bundle_fetches_per_connection="0")
    erin, dave = people(strict, "erin"), people(strict, "dave")
    with pytest.raises(RpcError) as e:
        erin.call("contacts.add", {"name": "dave", "link": dave.call("address.get")["link"]})
    err = e.value.to_object()
    assert err["code"] == 1011 and err["data"]["error"] == "rate_limited", err
    assert err["data"]["retry_after"] == 60
    assert "no contact address" not in err["message"]
