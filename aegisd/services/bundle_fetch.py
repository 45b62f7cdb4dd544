"""Fetching a contact's prekey bundle from their relay, with errors that say what happened.

An address link's bundle is shared by everyone who holds the link, so a fetch may meet the
relay's limits: "no contact address" is only what the relay's `denied` means (the mailbox or
its bundle is gone); a limit is reported as one (`rate_limited`, try again later), and the
per-connection fetch limit of the daemon's long-lived relay connection is not the contact's
fault: the fetch is made again once on a connection of its own.

Only a limit (`rate_limited`, with `retry_after`) and an unreachable relay (`relay_unavailable`
without `reason`) are worth trying again. Any other refusal is final: `denied` and `bad_frame`
(the address the link or the contact gave is not one the relay takes) are `bad_link`; the rest
(`bad_pow`, an internal error...) `relay_unavailable` with `reason: "refused"`, so that a caller
that retries by itself (a renewal request) drops the request instead (`retryable`).
"""

from __future__ import annotations

from aegisd.rpc import AppError
from aegisd.transport.network import Network
from aegisd.transport.relaylink import UNAVAILABLE, RelayLink, RelayUnavailable, with_relay
from relay.client import RelayError
from relay.wire import E_BAD_FRAME, E_BUSY, E_DENIED, E_LIMIT, E_RATE_LIMITED, ERROR_TEXT

E_RELAY_UNAVAILABLE = 1010
E_RATE_LIMITED_APP = 1011
E_BAD_LINK = 1022
#: What `rate_limited` suggests (seconds): the relay hands out one-time keys at about one a
#: minute per address; the bundle itself is never refused for the rate.
RETRY_AFTER = 60

Bundle = tuple[bytes, bytes | None, bytes | None]


class _SharedConnectionSpent(Exception):
    """The link's shared connection has made all the bundle fetches one connection may."""


async def _fetch_once(url: str, bundle_address: bytes, link: RelayLink | None,
                      network: Network) -> Bundle:
    """The bundle; _SharedConnectionSpent for `limit` on the link's shared connection only (a
    connection made for this fetch would meet the same limit again: no second dial)."""
    client, own = await with_relay(url, link, network)
    try:
        return await client.bundle_fetch(bundle_address)
    except RelayError as exc:
        if exc.code == E_LIMIT and not own:
            raise _SharedConnectionSpent() from None
        raise
    finally:
        if own:
            await client.close()


async def fetch_bundle(url: str, bundle_address: bytes, link: RelayLink | None,
                       network: Network) -> Bundle:
    """The bundle at `bundle_address` on `url`; AppError (bad_link, rate_limited,
    relay_unavailable) otherwise."""
    try:
        try:
            return await _fetch_once(url, bundle_address, link, network)
        except _SharedConnectionSpent:
            return await _fetch_once(url, bundle_address, None, network)
    except (RelayUnavailable, *UNAVAILABLE):
        raise relay_unavailable() from None
    except RelayError as exc:
        raise refused(exc.code) from None


def retryable(exc: AppError) -> bool:
    """Whether a fetch that failed so is worth making again later: a limit or an unreachable
    relay, not a refusal (a caller that retries by itself drops the request on the rest)."""
    data = exc.data or {}
    return data.get("error") == "rate_limited" or (
        data.get("error") == "relay_unavailable" and "reason" not in data)


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
    if code == E_BAD_FRAME:
        return AppError(E_BAD_LINK, "bad_link", "the relay does not take this link's address "
                        "(the link is malformed)")
    if code in (E_RATE_LIMITED, E_LIMIT, E_BUSY):
        return AppError(E_RATE_LIMITED_APP, "rate_limited",
                        "the contact's relay is limiting requests right now; try again later",
                        retry_after=RETRY_AFTER)  # fmt: skip
    return AppError(E_RELAY_UNAVAILABLE, "relay_unavailable",
                    f"the contact's relay refused the request ({ERROR_TEXT.get(code, code)})",
                    reason="refused")
