"""Fetching a contact's prekey bundle from their relay, with errors that say what happened.

An address link's bundle is shared by everyone who holds the link, so a fetch may meet the
relay's limits: "no contact address" is only what the relay's `denied` means (the mailbox or
its bundle is gone); a limit is reported as one (`rate_limited`, try again later), and the
per-connection fetch limit of the daemon's long-lived relay connection is not the contact's
fault: the fetch is made again once on a connection of its own.
"""

from __future__ import annotations

from aegisd.rpc import AppError
from aegisd.transport.network import Network
from aegisd.transport.relaylink import UNAVAILABLE, RelayLink, RelayUnavailable, with_relay
from relay.client import RelayError
from relay.wire import E_DENIED, E_LIMIT, E_RATE_LIMITED

E_RELAY_UNAVAILABLE = 1010
E_RATE_LIMITED_APP = 1011
E_BAD_LINK = 1022
#: What `rate_limited` suggests (seconds): the relay hands out one-time keys at about one a
#: minute per address; the bundle itself is never refused for the rate.
RETRY_AFTER = 60

Bundle = tuple[bytes, bytes | None, bytes | None]


async def _fetch_once(url: str, bundle_address: bytes, link: RelayLink | None,
                      network: Network) -> tuple[Bundle, bool]:
    """The bundle, and whether the connection was the link's shared one."""
    client, own = await with_relay(url, link, network)
    try:
        return await client.bundle_fetch(bundle_address), not own
    finally:
        if own:
            await client.close()


async def fetch_bundle(url: str, bundle_address: bytes, link: RelayLink | None,
                       network: Network) -> Bundle:
    """The bundle at `bundle_address` on `url`; AppError (bad_link, rate_limited,
    relay_unavailable) otherwise."""
    try:
        try:
            bundle, _ = await _fetch_once(url, bundle_address, link, network)
            return bundle
        except RelayError as exc:
            if exc.code != E_LIMIT or link is None:
                raise
        # The shared connection has made all the fetches one connection may: a fresh one.
        bundle, _ = await _fetch_once(url, bundle_address, None, network)
        return bundle
    except (RelayUnavailable, *UNAVAILABLE):
        raise relay_unavailable() from None
    except RelayError as exc:
        raise refused(exc.code) from None


def relay_unavailable() -> AppError:
    return AppError(
        E_RELAY_UNAVAILABLE,
        "relay_unavailable",
        "the relay is not reachable right now; try again later (aegis status shows why)",
    )


def refused(code: int) -> AppError:
    """The relay's refusal of a bundle fetch, in the user's terms."""
    if code == E_DENIED:
        return AppError(E_BAD_LINK, "bad_link", "the relay has no contact address for this link "
                        "(it was deleted or replaced: ask for a new link)")
    if code in (E_RATE_LIMITED, E_LIMIT):
        return AppError(E_RATE_LIMITED_APP, "rate_limited",
                        "the contact's relay is limiting requests right now; try again later",
                        retry_after=RETRY_AFTER)  # fmt: skip
    return relay_unavailable()
