"""Renewals.relay_delete against a real relay (docs/devices.md §4.5): what a DELETE's answer
means for the mailbox's queue row. OK and `denied` are "deleted" (gone, or a key this relay
will never take); `rate_limited` (as `limit`, `busy`, `internal`) is "away", the mailbox may
live on and the row must stay; a URL the policy refuses is "refused", never dialled. The
messenger is a stand-in for the few things relay_delete reads (the URL policy and the
profile's relay link); the relay and its answers are real. retire_due, on a real store: a
relay away is skipped and the rows at other relays still go, a row that keeps failing leaves
the queue after MAX_DELETE_TRIES, and nothing is raised."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from aegisd.services import renewal
from aegisd.services.mailbox import OwnedMailbox
from aegisd.services.renewal import Renewals
from aegisd.store import KdfParams, create_profile
from aegisd.store import devices as store_devices
from aegisd.transport.network import Network
from relay import storage as st
from relay.client import RelayClient
from tests.relay.conftest import RelayProcess, run


def _to_delete(url: str, owner_id: bytes, key: SigningKey) -> OwnedMailbox:
    # As a queued deletion holds it: the delete key in place of the owner key.
    return OwnedMailbox(url, bytes(key), b"", owner_id, b"", b"", b"")


def test_relay_delete_says_deleted_refused_or_away(tmp_path: Path) -> None:
    # Two uncached lookups per connection, refilled only after hours: the third is refused.
    relay = RelayProcess(tmp_path, {"--lookup-rate": "0.0001", "--lookup-burst": "2"})
    relay.start()
    url = f"ws://127.0.0.1:{relay.port}/v1/ws"
    allowed = {"ok": True}

    async def relay_has(owner_id: bytes) -> bool:
        with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
            return db.execute("SELECT 1 FROM mailboxes WHERE owner_key = ?",
                              (st.owner_key(owner_id),)).fetchone() is not None  # fmt: skip

    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        link: Any = SimpleNamespace(url=url)

        @contextlib.asynccontextmanager
        async def client(about: bytes | None = None) -> AsyncIterator[RelayClient]:
            yield c

        mailboxes: Any = SimpleNamespace(url_ok=lambda u: allowed["ok"], link=link,
                                         client=client)  # fmt: skip
        renewals = Renewals(cast(Any, SimpleNamespace(mailboxes=mailboxes)))
        try:
            sig, dk = SigningKey.generate(), SigningKey.generate()
            made = await c.create(sig, bytes(PrivateKey.generate().public_key),
                                  delete_pub=bytes(dk.verify_key))  # fmt: skip
            mb = _to_delete(url, made.owner_id, dk)
            allowed["ok"] = False  # the policy refuses the URL: nothing is sent
            assert await renewals.relay_delete(mb) == "refused"
            allowed["ok"] = True
            assert await renewals.relay_delete(mb) == "deleted"  # OK
            assert await relay_has(made.owner_id) is False
            # Made-up mailboxes: `denied` ("deleted") until the lookup bucket is empty.
            answers = [await renewals.relay_delete(
                _to_delete(url, os.urandom(16), SigningKey.generate())) for _ in range(3)]
            assert answers[0] == "deleted" and answers[-1] == "away"
            # The bucket is empty: rate_limited. The mailbox may live on: ask again later.
            sig2, dk2 = SigningKey.generate(), SigningKey.generate()
            c2 = await RelayClient.connect(relay.url)
            made2 = await c2.create(sig2, bytes(PrivateKey.generate().public_key),
                                    delete_pub=bytes(dk2.verify_key))  # fmt: skip
            await c2.close()
            live = _to_delete(url, made2.owner_id, dk2)
            assert await renewals.relay_delete(live) == "away"
            assert await relay_has(made2.owner_id) is True  # not deleted: "away" was right
        finally:
            await c.close()

    try:
        run(body())
    finally:
        relay.close()


def test_retire_due_skips_a_relay_away_and_gives_up_on_a_row_after_its_tries(
        tmp_path: Path) -> None:  # fmt: skip
    relay = RelayProcess(tmp_path, {})
    relay.start()
    url = f"ws://127.0.0.1:{relay.port}/v1/ws"
    with socket.socket() as s:  # a port nothing listens on: a relay away
        s.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{s.getsockname()[1]}/v1/ws"
    store = create_profile(tmp_path / "p", None, KdfParams(memory_kib=1024, time_cost=1,
                                                            parallelism=1))  # fmt: skip

    def queued() -> list[tuple[bytes, int]]:
        return [(OwnedMailbox.from_bytes(bytes(d)).owner_id, int(a)) for d, a in store.query(
            "SELECT descriptor, attempts FROM retired_mailboxes ORDER BY id").fetchall()]

    async def body() -> None:
        mailboxes: Any = SimpleNamespace(url_ok=lambda u: True, link=None)
        network = Network.from_settings(None, None, "direct", relay_url=url)
        host = SimpleNamespace(mailboxes=mailboxes, network=lambda: network, lock=asyncio.Lock(),
                               ctx=SimpleNamespace(store=store), store=store)  # fmt: skip
        renewals = Renewals(cast(Any, host))
        c = await RelayClient.connect(relay.url)
        try:
            sig, dk = SigningKey.generate(), SigningKey.generate()
            made = await c.create(sig, bytes(PrivateKey.generate().public_key),
                                  delete_pub=bytes(dk.verify_key))  # fmt: skip
        finally:
            await c.close()
        with store.transaction():  # the relay away first: it must not hold up the other
            for n in (1, 2):
                store_devices.retire_mailbox(store, _to_delete(dead, bytes([n]) * 16,
                                                               SigningKey.generate()).to_bytes())
            store_devices.retire_mailbox(store, _to_delete(url, made.owner_id, dk).to_bytes())
        await renewals.retire_due()  # no AppError: the connection's next steps go on
        # The live relay's row is gone (and its mailbox), the first row away was tried once,
        # the second (same relay) not at all this time.
        assert queued() == [(b"\x01" * 16, 1), (b"\x02" * 16, 0)]
        with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
            assert db.execute("SELECT 1 FROM mailboxes WHERE owner_key = ?",
                              (st.owner_key(made.owner_id),)).fetchone() is None  # fmt: skip
        # Two runs at once (a connection and a list change), and more connections within the
        # hour: one try counted per hour, however often the daemon connects.
        await asyncio.gather(renewals.retire_due(), renewals.retire_due())
        await renewals.retire_due()
        assert queued() == [(b"\x01" * 16, 1), (b"\x02" * 16, 0)]
        store.query("UPDATE retired_mailboxes SET attempts = ?, last_try = 0",
                    (renewal.MAX_DELETE_TRIES - 1,))  # fmt: skip
        await renewals.retire_due()
        assert queued() == [(b"\x02" * 16, renewal.MAX_DELETE_TRIES - 1)]

    try:
        run(body())
    finally:
        store.close()
        relay.close()
