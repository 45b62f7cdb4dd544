"""The daemon's periodic prekey check (issue 15 review, findings 8 and 9): a drainer who takes
the address's one-time items without ever making a first contact is answered by the periodic
BUNDLE_STATUS check, which tops them up; in isolated mode too (where it runs on the address's
own subscription connection). A real relay, a real daemon; the check's random interval is
shortened through a sitecustomize module in the daemon's path (the only change)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegisd.core import wire
from aegisd.services.address import ONE_TIME_LOW
from relay.client import RelayClient
from relay.storage import deposit_key
from tests.daemon.conftest import DaemonProc
from tests.functional.conftest import Peer
from tests.relay.conftest import RelayProcess

PATCH = """
import aegisd.services.address as m
m.PREKEY_CHECK_MIN, m.PREKEY_CHECK_MAX = 0.5, 1.5
"""


@pytest.fixture
def relay(tmp_short: Path) -> Iterator[RelayProcess]:
    sub = tmp_short / "relay"
    sub.mkdir()
    rp = RelayProcess(sub, {"--bundle-fetch-burst": "100"})  # a drainer takes them fast
    rp.start()
    try:
        yield rp
    finally:
        rp.close()


def items_left(relay: RelayProcess, deposit_id: bytes) -> int:
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        row = db.execute(
            "SELECT min(n) FROM (SELECT count(*) AS n FROM bundle_items JOIN mailboxes ON "
            "bundle_items.mailbox = mailboxes.id WHERE mailboxes.deposit_key = ? GROUP BY kind)",
            (deposit_key(deposit_id),),
        ).fetchone()
    return int(row[0] or 0)


@pytest.mark.parametrize("isolation", [False, True], ids=["shared", "isolated"])
def test_a_drained_address_is_topped_up_by_the_periodic_check(
    tmp_short: Path, relay: RelayProcess, isolation: bool
) -> None:
    url = f"ws://127.0.0.1:{relay.port}/v1/ws"
    bob = Peer(tmp_short / "bob", url, "bob")
    try:
        if isolation:
            bob.call("network.set", {"isolation": True})
            bob.wait_connected()  # the link reconnects with the new settings
        link = wire.ContactLink.from_text(bob.call("address.get")["link"])
        address = link.bundle_address
        bob.stop()
        site = tmp_short / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(PATCH)
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        bob.proc = DaemonProc(bob.home, [], env)
        bob.proc.wait_ready()
        bob.wait_connected()
        # The address's items are up (in isolated mode its connection may come a little later).
        full = bob.wait_for(lambda: items_left(relay, address) if items_left(relay, address)
                            >= ONE_TIME_LOW else 0, "the address's one-time items")

        async def drain() -> None:
            c = await RelayClient.connect(url)
            for _ in range(full - ONE_TIME_LOW + 5):
                await c.bundle_fetch(address)
            await c.close()

        asyncio.run(drain())
        # No first contact came: only the periodic check can see the drain, and top up.
        bob.wait_for(lambda: items_left(relay, address) >= ONE_TIME_LOW, "the top-up")
    finally:
        bob.stop()
