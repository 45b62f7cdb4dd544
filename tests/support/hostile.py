"""A hostile contact for tests: blocks a contact's own software would never send, made with
its real keys and its real ratchet session, deposited to the real relay.

The contact's daemon must be stopped first (its profile is opened here, in-process, and its
session advanced); nothing here stands in for the daemon under test.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import _VERSION_BYTE, Session, _fragment_body
from aegisd.services.mailbox import ContactState
from aegisd.store.db import Store
from aegisd.store.keyring import Keyring
from relay.client import RelayClient


class Hostile:
    """The stopped profile at ``home`` writing to its contact ``name`` as it pleases."""

    def __init__(self, home: Path, name: str) -> None:
        key = Keyring.load(home / "keyring.json").unlock(None)
        self.store = Store.open(home / "aegis.db", key)
        c = self.store.contact_by_name(name)
        assert c is not None, name
        self.contact = c
        blob = self.store.get_session(c.id)
        assert blob is not None
        self.session = Session.from_bytes(blob)
        state = ContactState.from_bytes(c.state)
        assert state.send_to is not None
        self.send_to = state.send_to
        self.entropy = SystemEntropy()

    def close(self) -> None:
        self.store.put_session(self.contact.id, self.session.to_bytes())
        self.store.close()

    def payload_blocks(self, payload: wire.Payload) -> list[bytes]:
        """A whole payload, as the contact's software would send it."""
        return self.session.encrypt(self.entropy, wire.encode_payload(payload))

    def fragment_block(self, msg_id: bytes, index: int, count: int, data: bytes) -> bytes:
        """One fragment of a multi-block message whose other fragments never come."""
        s = self.session
        body = _fragment_body(wire.Fragment(msg_id, index, count, data), wire.RATCHET_BODY_PT_LEN)
        return _VERSION_BYTE + s.ratchet.encrypt(self.entropy, body, s.ad + _VERSION_BYTE)

    def renewal_block(
        self, created_at_ms: int, bundle_address: bytes, reply_to: wire.MailboxAddress | None = None
    ) -> bytes:
        """A session-renewal request (docs/protocol.md §23), as a restored profile makes it:
        only the identity's holder can; here it is made again and again. ``reply_to``: the
        mailbox the answer goes to (default: the one the contact writes to)."""
        from aegisd.core import renewal
        from aegisd.core.prekeys import PrekeyStore

        state = self.store.get_identity()
        assert state is not None
        ident = PrekeyStore.from_bytes(state).identity
        payload = wire.RenewPayload(
            self.entropy.random(wire.MESSAGE_ID_LEN), created_at_ms, reply_to or self.send_to,
            bundle_address, "mallory",
        )  # fmt: skip
        return renewal.seal(self.entropy, ident, self.session.remote, wire.encode_payload(payload))

    def renewal_block_with_address(self, created_at_ms: int, bundle_address: bytes) -> bytes:
        """A renewal request whose bundle address may have any length (1..64 bytes, as the
        length byte allows): what no encoder of ours writes any more."""
        from aegisd.core import renewal
        from aegisd.core.prekeys import PrekeyStore

        state = self.store.get_identity()
        assert state is not None
        ident = PrekeyStore.from_bytes(state).identity
        placeholder = b"\xa5" * 16
        payload = wire.encode_payload(wire.RenewPayload(
            self.entropy.random(wire.MESSAGE_ID_LEN), created_at_ms, self.send_to,
            placeholder, "mallory",
        ))  # fmt: skip
        at = payload.index(bytes([16]) + placeholder)
        raw = payload[:at] + bytes([len(bundle_address)]) + bundle_address + payload[at + 17:]
        return renewal.seal(self.entropy, ident, self.session.remote, raw)

    def deposit(self, url: str, blocks: list[bytes]) -> None:
        async def go() -> None:
            client = await RelayClient.connect(url)
            try:
                for block in blocks:
                    await client.deposit(
                        self.send_to.deposit_id, block, self.send_to.send_token or None
                    )
            finally:
                await client.close()

        asyncio.run(go())


@contextmanager
def hostile(home: Path, name: str) -> Iterator[Hostile]:
    h = Hostile(home, name)
    try:
        yield h
    finally:
        h.close()


def resign(pair: IdentityKeyPair) -> IdentityKeyPair:
    """The same identity keys with another valid binding signature: Ed25519 signed with a
    random nonce instead of the deterministic one (only the key's holder can)."""
    import hashlib

    from nacl import bindings as b

    from aegisd.core.identity import _binding_message

    ed_priv, x_priv = pair.raw_private()
    a_pub = pair.public.ed_pub
    h = bytearray(hashlib.sha512(ed_priv[:32]).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    a = b.crypto_core_ed25519_scalar_reduce(bytes(h) + bytes(32))
    msg = _binding_message(a_pub, pair.public.x_pub)
    r = b.crypto_core_ed25519_scalar_reduce(os.urandom(64))
    big_r = b.crypto_scalarmult_ed25519_base_noclamp(r)
    k = b.crypto_core_ed25519_scalar_reduce(hashlib.sha512(big_r + a_pub + msg).digest())
    s = b.crypto_core_ed25519_scalar_add(r, b.crypto_core_ed25519_scalar_mul(k, a))
    sig = big_r + s
    assert sig != pair.public.binding_sig
    return IdentityKeyPair.from_raw(ed_priv, x_priv, sig)  # verifies the new signature


def resign_profile(home: Path) -> None:
    """Give the stopped profile at ``home`` its identity with another binding signature."""
    from aegisd.core.prekeys import PrekeyStore

    key = Keyring.load(home / "keyring.json").unlock(None)
    store = Store.open(home / "aegis.db", key)
    try:
        state = store.get_identity()
        assert state is not None
        ps = PrekeyStore.from_bytes(state)
        ps.identity = resign(ps.identity)
        store.put_identity(ps.to_bytes())
    finally:
        store.close()
