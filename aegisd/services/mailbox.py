"""Descriptors of mailboxes: the ones the profile owns and the ones it deposits to.

Both are kept in the encrypted store as small JSON documents (opaque to the store).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey

from aegisd.core import wire


@dataclass(frozen=True)
class OwnedMailbox:
    """A mailbox this profile receives on: its relay, its keys and the relay's IDs for it."""

    relay_url: str
    sign_seed: bytes  # per-mailbox Ed25519 key (never the identity key)
    box_secret: bytes  # per-mailbox X25519 key the relay re-encrypts deliveries to
    owner_id: bytes
    deposit_id: bytes
    relay_box_pub: bytes
    token: bytes  # the send-capability token handed to the contact; empty: proof-of-work
    # The mailbox's delete-only Ed25519 key (relay-protocol.md §4.1), handed to this profile's
    # other devices; empty for a mailbox made before delete keys (then only this device can
    # delete it).
    delete_seed: bytes = b""

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.sign_seed)

    def delete_cap(self) -> DeleteCap | None:
        """What another device needs to delete this mailbox (and nothing else); None if it
        has no delete key."""
        if not self.delete_seed:
            return None
        return DeleteCap(self.relay_url, self.owner_id, self.delete_seed)

    def open(self, sealed: bytes) -> bytes:
        """Undo the relay's re-encryption of a delivered block."""
        box = Box(PrivateKey(self.box_secret), PublicKey(self.relay_box_pub))
        return bytes(box.decrypt(sealed))

    def address(self) -> wire.MailboxAddress:
        """What a contact needs to deposit here."""
        return wire.MailboxAddress(self.relay_url, self.deposit_id, self.token)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "relay_url": self.relay_url,
                "sign_seed": self.sign_seed.hex(),
                "box_secret": self.box_secret.hex(),
                "owner_id": self.owner_id.hex(),
                "deposit_id": self.deposit_id.hex(),
                "relay_box_pub": self.relay_box_pub.hex(),
                "token": self.token.hex(),
                **({"delete_seed": self.delete_seed.hex()} if self.delete_seed else {}),
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> OwnedMailbox:
        d = json.loads(data)
        return cls(
            d["relay_url"],
            bytes.fromhex(d["sign_seed"]),
            bytes.fromhex(d["box_secret"]),
            bytes.fromhex(d["owner_id"]),
            bytes.fromhex(d["deposit_id"]),
            bytes.fromhex(d["relay_box_pub"]),
            bytes.fromhex(d["token"]),
            bytes.fromhex(d.get("delete_seed", "")),
        )

    def __repr__(self) -> str:
        return "OwnedMailbox(<hidden>)"


MAX_CAP_URL = 512  # a relay URL in a delete capability (hostile input: bounded)


@dataclass(frozen=True)
class DeleteCap:
    """The capability to delete one mailbox of another device of this profile at its relay:
    its owner ID and its delete key (docs/devices.md §6, §7). It reads nothing."""

    relay_url: str
    owner_id: bytes
    delete_seed: bytes

    def to_json(self) -> dict[str, str]:
        return {"relay_url": self.relay_url, "owner_id": self.owner_id.hex(),
                "delete_key": self.delete_seed.hex()}  # fmt: skip

    @classmethod
    def from_json(cls, d: Any) -> DeleteCap:
        """Strict: a device's bytes are checked as any peer's (ValueError if malformed)."""
        if not isinstance(d, dict) or set(d) != {"relay_url", "owner_id", "delete_key"}:
            raise ValueError("not a delete capability")
        url, owner_id, key = d["relay_url"], d["owner_id"], d["delete_key"]
        if not all(isinstance(x, str) for x in (url, owner_id, key)) or not (
            0 < len(url) <= MAX_CAP_URL
        ):
            raise ValueError("not a delete capability")
        out = cls(url, bytes.fromhex(owner_id), bytes.fromhex(key))
        if len(out.owner_id) != 16 or len(out.delete_seed) != 32:
            raise ValueError("not a delete capability")
        return out

    def as_mailbox(self) -> OwnedMailbox:
        """A descriptor whose signing key is the delete key: what the retired-mailbox queue
        deletes with (renewal.py retire_due), so a deletion the relay did not take yet waits
        there, across restarts."""
        return OwnedMailbox(self.relay_url, self.delete_seed, b"", self.owner_id, b"", b"", b"")

    def __repr__(self) -> str:
        return "DeleteCap(<hidden>)"


def caps_to_bytes(caps: list[DeleteCap]) -> bytes:
    return json.dumps([c.to_json() for c in caps]).encode()


def caps_from_bytes(data: bytes, limit: int = 16) -> list[DeleteCap]:
    """At most `limit` capabilities; ValueError if malformed or more."""
    try:
        items = json.loads(data) if data else []
    except ValueError:
        raise ValueError("not a list of delete capabilities") from None
    if not isinstance(items, list) or len(items) > limit:
        raise ValueError("not a list of delete capabilities")
    return [DeleteCap.from_json(x) for x in items]


def address_to_bytes(a: wire.MailboxAddress) -> bytes:
    return json.dumps(
        {"relay_url": a.relay_url, "deposit_id": a.deposit_id.hex(), "token": a.send_token.hex()}
    ).encode()


def address_from_bytes(data: bytes) -> wire.MailboxAddress:
    d = json.loads(data)
    return wire.MailboxAddress(
        d["relay_url"], bytes.fromhex(d["deposit_id"]), bytes.fromhex(d["token"])
    )


@dataclass
class ContactState:
    """Per-contact routing, kept in contacts.state: where to deposit, whether the contact
    has answered (until then only the first contact has been sent), and why it can never
    answer (``failed``: its first contact was refused for good; kept until removed)."""

    send_to: wire.MailboxAddress | None
    established: bool
    failed: str | None = None

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "send_to": None if self.send_to is None else json.loads(address_to_bytes(self.send_to)),
            "established": self.established,
        }
        if self.failed:
            doc["failed"] = self.failed
        return json.dumps(doc).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> ContactState:
        if not data:
            return cls(None, False)
        d = json.loads(data)
        send_to = d.get("send_to")
        return cls(
            None if send_to is None else address_from_bytes(json.dumps(send_to).encode()),
            bool(d.get("established")),
            d.get("failed") or None,
        )


def new_delete_seed() -> bytes:
    """A fresh delete-only key for a mailbox (its seed)."""
    return bytes(SigningKey.generate())


def delete_public(delete_seed: bytes) -> bytes:
    return bytes(SigningKey(delete_seed).verify_key)


def new_keys() -> tuple[bytes, bytes]:
    """A fresh per-mailbox signing seed and box secret."""
    return bytes(SigningKey.generate()), bytes(PrivateKey.generate())


def box_public(box_secret: bytes) -> bytes:
    return bytes(PrivateKey(box_secret).public_key)
