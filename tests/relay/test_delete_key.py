"""The delete-only key of a mailbox (docs/relay-protocol.md §4, §4.1): CREATE registers it,
DELETE signed by it is accepted, every other owner command signed by it is refused."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from relay import storage as st
from relay import wire
from relay.client import RelayClient, RelayError

from .conftest import RelayProcess, run
from .helpers import Owner, block


async def _owner_with_delete_key(c: RelayClient, token: bytes) -> tuple[Owner, SigningKey]:
    sig, box, dk = SigningKey.generate(), PrivateKey.generate(), SigningKey.generate()
    created = await c.create(sig, bytes(box.public_key), delete_pub=bytes(dk.verify_key))
    await c.token_add(created.owner_id, sig, token)
    return Owner(sig, box, created), dk


async def _denied(coro: object) -> None:
    with pytest.raises(RelayError) as e:
        await coro  # type: ignore[misc]
    assert e.value.code == wire.E_DENIED


@pytest.mark.both_backends
def test_delete_key_deletes_and_authorises_nothing_else(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o, dk = await _owner_with_delete_key(c, token)
        # Every other owner command, signed by the delete key: refused, nothing changed.
        await _denied(c.subscribe(o.owner_id, dk))
        await _denied(c.unsubscribe(o.owner_id, dk))
        await _denied(c.fetch(o.owner_id, dk))
        await _denied(c.token_add(o.owner_id, dk, os.urandom(32)))
        await _denied(c.token_del(o.owner_id, dk, token))
        await _denied(c.bundle_base(o.owner_id, dk, b"base"))
        await _denied(c.bundle_add(o.owner_id, dk, wire.ITEM_X25519, [os.urandom(38)]))
        await _denied(c.bundle_status(o.owner_id, dk))
        # The mailbox is untouched: the token still works, the owner still reads.
        b = block(b"kept")
        await c.deposit(o.deposit_id, b, token=token)
        got = await o.fetch(c)
        assert [o.open(m) for m in got] == [b]
        await c.ack([m.msg_id for m in got])
        # Another key deletes nothing; the delete key does (on a connection of its own, after a
        # restart, so the key comes from storage, not from the node's cache).
        await _denied(c.delete(o.owner_id, SigningKey.generate()))
        await c.close()
        relay.terminate()
        relay.start()
        d = await RelayClient.connect(relay.url)
        await d.delete(o.owner_id, dk)
        await _denied(d.deposit(o.deposit_id, block(), token=token))
        await _denied(o.subscribe(d))
        await _denied(d.delete(o.owner_id, dk))  # gone: as any missing mailbox
        await d.close()

    run(body())


@pytest.mark.both_backends
def test_owner_key_still_deletes_and_old_creates_have_no_delete_key(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o, _ = await _owner_with_delete_key(c, token)
        await c.delete(o.owner_id, o.sig)  # the owner key deletes as before
        await _denied(c.deposit(o.deposit_id, block(), token=token))
        # A CREATE as an older client sends it (flags bit 1 clear, no key): only the owner key
        # deletes; a stray key, even one that signs a well-formed DELETE, does not.
        sig, box = SigningKey.generate(), PrivateKey.generate()
        created = await c.create(sig, bytes(box.public_key))
        await _denied(c.delete(created.owner_id, SigningKey.generate()))
        await c.subscribe(created.owner_id, sig)
        await c.delete(created.owner_id, sig)
        await c.close()

    run(body())


def test_create_with_the_delete_flag_needs_the_key(relay: RelayProcess) -> None:
    async def body() -> None:
        sig_pub, box_pub = bytes(SigningKey.generate().verify_key), os.urandom(32)
        # flags bit 1 without the 32 bytes, and the key without the flag: malformed (a
        # malformed frame ends the connection, so one each).
        for flags, extra in ((wire.CREATE_DELETE_KEY, b""), (0, os.urandom(32))):
            c = await RelayClient.connect(relay.url)
            body_ = sig_pub + box_pub + bytes([flags]) + extra + bytes(16) + bytes(64)
            with pytest.raises(RelayError) as e:
                await c.request(wire.CREATE, body_)
            assert e.value.code == wire.E_BAD_FRAME
            await c.close()

    run(body())


def test_parse_create_both_layouts() -> None:
    sig_pub, box_pub, dk, nonce, sig = (os.urandom(32), os.urandom(32), os.urandom(32),
                                        os.urandom(16), os.urandom(64))
    assert wire.parse_create(sig_pub + box_pub + b"\x01" + nonce + sig) == (
        sig_pub, box_pub, 1, None, nonce, sig)
    assert wire.parse_create(sig_pub + box_pub + b"\x03" + dk + nonce + sig) == (
        sig_pub, box_pub, 3, dk, nonce, sig)
    # The proof of work is bound to the delete key too; without one, the hash is as before.
    assert wire.create_pow_hash(sig_pub, box_pub, 2, dk) != wire.create_pow_hash(
        sig_pub, box_pub, 2, os.urandom(32))
    assert wire.create_pow_hash(sig_pub, box_pub, 0) == wire.create_pow_hash(
        sig_pub, box_pub, 0, None)


def test_a_schema_3_database_gets_the_delete_key_column(tmp_path: Path) -> None:
    """Upgrade 3 -> 4: a nullable column; the mailboxes already there have no delete key."""
    path = tmp_path / "relay.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(st._SCHEMA + "\n" + st.schema_3(5) + "\nPRAGMA user_version=3;")
    db.execute("INSERT INTO mailboxes VALUES (7, ?, ?, ?, x'02', x'03', 0, x'', 5)",
               (b"o" * 32, b"d" * 32, os.urandom(32)))
    db.close()

    async def body() -> tuple[st.MailboxRow | None, st.MailboxRow | None]:
        s = st.SQLiteStorage(str(tmp_path))
        await s.open()
        try:
            old = await s.load_mailbox(okey=b"o" * 32)
            dk = os.urandom(32)
            await s.create_mailbox(b"p" * 32, b"e" * 32, os.urandom(32), b"s", b"b", False, 0,
                                   dk)
            new = await s.load_mailbox(okey=b"p" * 32)
            assert new is not None and new.del_pub == dk
            return old, new
        finally:
            await s.close()

    old, _ = run(body())
    assert old is not None and old.id == 7 and old.del_pub is None and old.used == 5
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (st.SCHEMA_VERSION,) == (4,)
    db.close()
