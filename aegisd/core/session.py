"""Sessions and blocks: what the daemon calls to turn content into blocks and back.

Two block layouts share one look (a version byte, then bytes indistinguishable from random):
- a first-contact block opens a session (sealed PQXDH + the first ratchet message);
- a ratchet block carries one fragment of a message in an established session.
Which one a received block is follows from the mailbox it arrived at (docs/protocol.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from . import pqxdh, wire
from . import primitives as p
from .errors import BundleError, DecodeError, DecryptionError, StateError
from .identity import IdentityKeyPair, PublicIdentity
from .prekeys import PrekeyStore, replay_digest
from .primitives import Entropy
from .ratchet import Ratchet

_VERSION_BYTE = bytes((wire.VERSION,))


def _fragment_body(fragment: wire.Fragment, length: int) -> bytes:
    return fragment.to_body(length)


def _read_body(body: bytes) -> wire.Fragment:
    try:
        return wire.Fragment.from_body(body)
    except DecodeError:
        raise DecryptionError() from None


def split_content(content: bytes, capacity: int = wire.RATCHET_CAPACITY) -> list[bytes]:
    if not content:
        return [b""]
    chunks = [content[i : i + capacity] for i in range(0, len(content), capacity)]
    if len(chunks) > wire.MAX_FRAGMENTS:
        raise StateError("content is too large for one message")
    return chunks


class Session:
    """An established end-to-end session with one contact."""

    __slots__ = ("_ad_v", "ad", "ratchet", "remote")

    def __init__(self, ratchet: Ratchet, ad: bytes, remote: PublicIdentity) -> None:
        self.ratchet = ratchet
        self.ad = ad
        self.remote = remote
        self._ad_v = ad + _VERSION_BYTE  # the version byte is authenticated with every block

    def encrypt(self, entropy: Entropy, content: bytes) -> list[bytes]:
        """Content -> one or more ratchet blocks, each exactly BLOCK_SIZE bytes."""
        chunks = split_content(content)
        msg_id = entropy.random(wire.MSG_ID_LEN)
        return [
            _VERSION_BYTE
            + self.ratchet.encrypt(
                entropy,
                _fragment_body(
                    wire.Fragment(msg_id, i, len(chunks), chunk), wire.RATCHET_BODY_PT_LEN
                ),
                self._ad_v,
            )
            for i, chunk in enumerate(chunks)
        ]

    def decrypt(self, entropy: Entropy, block: bytes) -> wire.Fragment:
        """One ratchet block -> its fragment. Any failure to authenticate is DecryptionError
        and leaves the state unchanged. A block that authenticates but whose fragment is
        malformed (only the peer can produce one) also raises DecryptionError, after the
        ratchet advanced, so that the same block cannot be replayed."""
        if len(block) != wire.BLOCK_SIZE or block[0] != wire.VERSION:
            raise DecryptionError()
        return _read_body(self.ratchet.decrypt(entropy, block[1:], self._ad_v))

    def to_bytes(self) -> bytes:
        return wire.SessionRecord(
            self.ad, self.remote.record(), self.ratchet.to_record().to_bytes()
        ).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Session:
        rec = wire.SessionRecord.from_bytes(data)
        ratchet = Ratchet.from_record(wire.RatchetStateRecord.from_bytes(rec.ratchet))
        return cls(ratchet, rec.ad, PublicIdentity.from_record(rec.remote))

    def __repr__(self) -> str:
        return "Session(<hidden>)"


# --- first contact ----------------------------------------------------------------------------


def initiate_session(
    entropy: Entropy,
    identity: IdentityKeyPair,
    bundle: pqxdh.VerifiedBundle,
    content: bytes | Callable[[bytes], bytes],
) -> tuple[Session, bytes]:
    """PQXDH with a verified bundle; returns the new session and the sealed first-contact block.

    `content` (at most FIRST_CONTACT_CAPACITY bytes) travels inside the first ratchet message;
    a callable is given the session's `EK_A.pub` first (a device hello binds it, §28.4).
    """
    keys = pqxdh.initiate(entropy, identity, bundle)
    if callable(content):
        content = content(keys.prefix.ephemeral_pub)
    if len(content) > wire.FIRST_CONTACT_CAPACITY:
        raise StateError("first-contact content is too large for one block")
    ratchet = Ratchet.init_initiator(entropy, keys.sk, bundle.spk_pub)
    ad_v = keys.ad + _VERSION_BYTE
    fragment = wire.Fragment(entropy.random(wire.MSG_ID_LEN), 0, 1, content)
    message = ratchet.encrypt(
        entropy, _fragment_body(fragment, wire.FIRST_CONTACT_BODY_PT_LEN), ad_v
    )
    prefix = keys.prefix.to_bytes()
    block = prefix + p.seal_once(keys.seal_key, identity.public.to_bytes() + message, prefix)
    assert len(block) == wire.BLOCK_SIZE
    return Session(ratchet, keys.ad, bundle.identity), block


@dataclass(frozen=True)
class FirstContact:
    session: Session
    sender: PublicIdentity
    fragment: wire.Fragment


def accept_first_contact(entropy: Entropy, store: PrekeyStore, block: bytes) -> FirstContact:
    """Open a first-contact block. Burns the one-time prekeys it used (or records the block in
    the replay cache) only once it authenticated; on any failure raises DecryptionError and
    changes nothing."""
    try:
        prefix = wire.FirstContactPrefix.from_block(block)
        digest = replay_digest(block)
        store.check_not_replayed(prefix.pqpk_id, digest)
        keys = pqxdh.respond(store, prefix)
        head = block[: wire.FIRST_CONTACT_PREFIX_LEN]
        inner = p.open_once(keys.seal_key, block[wire.FIRST_CONTACT_PREFIX_LEN :], head)
        sender = PublicIdentity.from_bytes(inner[: wire.IDENTITY_LEN])
        sk, ad = keys.session_key(store, sender)
        ratchet = Ratchet.init_responder(sk, keys.spk)
        fragment = _read_body(
            ratchet.decrypt(entropy, inner[wire.IDENTITY_LEN :], ad + _VERSION_BYTE)
        )
    except (DecodeError, BundleError):
        raise DecryptionError() from None
    if fragment.count != 1:  # a first contact is always a single fragment
        raise DecryptionError()
    store.consume(prefix.opk_id, prefix.pqpk_id, digest)
    return FirstContact(Session(ratchet, ad, sender), sender, fragment)


# --- reassembly -------------------------------------------------------------------------------


class Reassembler:
    """Collects fragments into whole messages; bounded, pure, order-independent.

    At most `max_pending` incomplete messages and `max_bytes` of their data are held; beyond
    that the oldest incomplete message is dropped. A repeated fragment is ignored.
    """

    def __init__(self, max_pending: int = 64, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self._pending: OrderedDict[bytes, dict[int, bytes]] = OrderedDict()
        self._counts: dict[bytes, int] = {}
        self._bytes = 0

    def add(self, fragment: wire.Fragment) -> bytes | None:
        """The whole content once its last fragment arrived, else None."""
        if fragment.count == 1:
            return fragment.data
        known = self._counts.setdefault(fragment.msg_id, fragment.count)
        if known != fragment.count:
            raise DecodeError("fragment count disagrees with earlier fragments")
        parts = self._pending.setdefault(fragment.msg_id, {})
        if fragment.index in parts:
            return None
        parts[fragment.index] = fragment.data
        self._bytes += len(fragment.data)
        if len(parts) == fragment.count:
            self._drop(fragment.msg_id)
            return b"".join(parts[i] for i in range(fragment.count))
        while self._pending and (
            len(self._pending) > self.max_pending or self._bytes > self.max_bytes
        ):
            self._drop(next(iter(self._pending)))
        return None

    def _drop(self, msg_id: bytes) -> None:
        parts = self._pending.pop(msg_id)
        del self._counts[msg_id]
        self._bytes -= sum(len(d) for d in parts.values())
