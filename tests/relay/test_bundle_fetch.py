"""Bundle fetches under a drainer (issue 15, items 7 and 9), against a real relay process.

The per-mailbox bucket rations one-time items, not answers: a fetcher who empties it gets the
base alone (the last-resort keys) and so does everyone else, nobody is refused. And a mailbox
that exists without a bundle answers as one deleted or never created: `denied`, every time
(relay-protocol.md §4.1)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pytest

from relay import wire
from relay.client import RelayClient, RelayError
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import new_owner

BURST = 3
#: Fast proofs of work and a bucket that does not refill within the test.
OPTIONS = {"pow_bundle_bits": "4", "bundle_fetch_burst": str(BURST),
           "bundle_fetch_rate": "0.0001"}  # fmt: skip


@pytest.mark.both_backends
def test_a_drainer_starves_nobody(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(**OPTIONS)

    async def body() -> None:
        owner_conn = await RelayClient.connect(rp.url)
        o = await new_owner(owner_conn, public=True)
        base = os.urandom(1482)
        await owner_conn.bundle_base(o.owner_id, o.sig, base)
        await owner_conn.bundle_add(o.owner_id, o.sig, wire.ITEM_X25519,
                                    [os.urandom(38) for _ in range(10)])
        await owner_conn.bundle_add(o.owner_id, o.sig, wire.ITEM_MLKEM,
                                    [os.urandom(1254) for _ in range(10)])
        drainer = await RelayClient.connect(rp.url)
        got = [await drainer.bundle_fetch(o.deposit_id) for _ in range(BURST + 5)]
        # The bucket's worth of one-time items, then the base alone: never a refusal.
        assert all(b[0] == base for b in got)
        assert [b[1] is not None and b[2] is not None for b in got] == (
            [True] * BURST + [False] * 5)
        # Someone else, meanwhile: a valid bundle (last-resort keys), not `rate_limited`.
        other = await RelayClient.connect(rp.url)
        assert await other.bundle_fetch(o.deposit_id) == (base, None, None)
        # The items the bucket kept back are still there for later fetchers.
        assert await owner_conn.bundle_status(o.owner_id, o.sig) == (10 - BURST, 10 - BURST)
        for c in (owner_conn, drainer, other):
            await c.close()

    run(body())


@pytest.mark.both_backends
def test_existing_and_deleted_mailboxes_answer_alike(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    rp = relay_factory(**OPTIONS)

    async def answers(c: RelayClient, deposit_id: bytes) -> list[int]:
        out = []
        for _ in range(BURST + 3):
            try:
                await c.bundle_fetch(deposit_id)
                out.append(0)
            except RelayError as exc:
                out.append(exc.code)
        return out

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        kept = await new_owner(c)  # a contact's mailbox: it exists, it has no bundle
        public = await new_owner(c, public=True)
        gone = await new_owner(c, public=True)  # an address, with a bundle, then deleted
        await c.bundle_base(gone.owner_id, gone.sig, os.urandom(100))
        await c.delete(gone.owner_id, gone.sig)
        denied = [wire.E_DENIED] * (BURST + 3)
        for who in (kept.deposit_id, public.deposit_id, gone.deposit_id, os.urandom(16)):
            fetcher = await RelayClient.connect(rp.url)
            assert await answers(fetcher, who) == denied
            await fetcher.close()
        await c.close()

    run(body())


#: A lookup bucket a prober can empty in a few frames, and that does not refill in the test.
PROBE_OPTIONS = {**OPTIONS, "lookup_burst": "10", "lookup_rate": "0.0001"}


async def _empty_lookup_bucket(c: RelayClient) -> None:
    """Owner commands with made-up owner ids: each misses the cache (no proof of work)."""
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    for _ in range(12):
        with contextlib.suppress(RelayError):
            await c.bundle_status(os.urandom(16), key)


async def _answer(call: object) -> int:
    try:
        await call  # type: ignore[misc]
        return 0
    except RelayError as exc:
        return exc.code


@pytest.mark.both_backends
def test_an_empty_lookup_bucket_tells_nothing(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """The review's probe (issue 15 item 9): fetch the target once (a live mailbox stays in the
    relay's cache), empty the connection's lookup bucket with made-up owner ids, fetch again.
    A live mailbox and a deleted (or never created) one must still answer alike, for bundle
    fetches and for deposits."""
    rp = relay_factory(**PROBE_OPTIONS)

    async def probe_fetch(deposit_id: bytes) -> list[int]:
        c = await RelayClient.connect(rp.url)
        out = [await _answer(c.bundle_fetch(deposit_id))]
        await _empty_lookup_bucket(c)
        out += [await _answer(c.bundle_fetch(deposit_id)) for _ in range(3)]
        await c.close()
        return out

    async def probe_deposit(deposit_id: bytes) -> list[int]:
        c = await RelayClient.connect(rp.url)
        bad_token = os.urandom(32)
        out = [await _answer(c.deposit(deposit_id, os.urandom(wire.BLOCK_SIZE), bad_token))]
        await _empty_lookup_bucket(c)
        out += [await _answer(c.deposit(deposit_id, os.urandom(wire.BLOCK_SIZE), bad_token))
                for _ in range(3)]
        await c.close()
        return out

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        live = await new_owner(c)  # exists, no bundle: `denied`
        gone = await new_owner(c)
        await c.delete(gone.owner_id, gone.sig)
        await c.close()
        targets = (live.deposit_id, gone.deposit_id, os.urandom(16))
        fetches = [await probe_fetch(t) for t in targets]
        assert fetches[0] == [wire.E_DENIED] * 4
        assert fetches[1] == fetches[0] and fetches[2] == fetches[0]
        deposits = [await probe_deposit(t) for t in targets]
        assert deposits[1] == deposits[0] and deposits[2] == deposits[0]

    run(body())
