"""The daemon's bundle fetch against a real relay (issue 15 review, findings 2 and 7): what
each relay answer becomes, which of them a caller that retries by itself (a renewal request)
tries again, and a `limit` met on a connection of the fetch's own is not dialled again."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aegisd.transport.relaylink as relaylink
from aegisd.rpc import AppError
from aegisd.services.bundle_fetch import fetch_bundle, retryable
from aegisd.transport.network import Network
from aegisd.transport.relaylink import RelayLink
from relay.client import RelayClient
from tests.relay.conftest import RelayProcess
from tests.relay.helpers import new_owner


def _relay(options: dict[str, str]) -> Iterator[RelayProcess]:
    d = Path(tempfile.mkdtemp(prefix="ae", dir="/tmp"))
    rp = RelayProcess(d, options)
    rp.start()
    try:
        yield rp
    finally:
        rp.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def spent_relay() -> Iterator[RelayProcess]:
    """A relay where every connection has used its bundle fetches: each one is `limit`."""
    yield from _relay({"--bundle-fetches-per-connection": "0"})


@pytest.fixture
def relay_process() -> Iterator[RelayProcess]:
    yield from _relay({})


def _url(rp: RelayProcess) -> str:
    return f"ws://127.0.0.1:{rp.port}/v1/ws"


async def _failure(coro: Any) -> AppError:
    with pytest.raises(AppError) as e:
        await coro
    return e.value


def test_denied_and_a_malformed_address_are_final(relay_process: RelayProcess) -> None:
    url = _url(relay_process)

    async def main() -> None:
        net = Network.from_settings(None, None, "direct", url)  # the relay is the user's own
        gone = await _failure(fetch_bundle(url, os.urandom(16), None, net))
        assert gone.data["error"] == "bad_link" and not retryable(gone)
        # 17 bytes: the relay answers `bad_frame` (and closes the connection): never retried.
        bad = await _failure(fetch_bundle(url, os.urandom(17), None, net))
        assert bad.data["error"] == "bad_link" and not retryable(bad)

    asyncio.run(main())


def test_a_limit_is_retryable_and_not_redialled_on_an_own_connection(
    spent_relay: RelayProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _url(spent_relay)
    dials: list[str] = []
    real = relaylink._connect

    async def counting(u: str, network: Network) -> RelayClient:
        dials.append(u)
        return await real(u, network)

    monkeypatch.setattr(relaylink, "_connect", counting)

    async def main() -> None:
        admin = await RelayClient.connect(url)
        o = await new_owner(admin, public=True)
        # An isolated link: bundle fetches go on a connection of their own, never the link's.
        link = RelayLink(url, handler=lambda c, m: asyncio.sleep(0), subscriptions=lambda: [],
                         on_state=lambda up, reason: None, network=Network(isolation=True))
        link.start()
        await asyncio.wait_for(link.connected.wait(), 20)
        before = len(dials)
        err = await _failure(fetch_bundle(url, o.deposit_id, link, link.network))
        assert err.data["error"] == "rate_limited" and retryable(err)
        # The connection was the fetch's own: a second dial (and proof of work) would meet the
        # same limit, so there is none.
        assert len(dials) - before == 1
        await link.stop()
        await admin.close()

    asyncio.run(main())
