"""Mailbox descriptors with a delete key, and the delete capabilities devices hand each other
(docs/devices.md §4.2, §6): strict parsing, as any peer's bytes."""

from __future__ import annotations

import json

import pytest
from nacl.signing import SigningKey

from aegisd.services.mailbox import (
    DeleteCap,
    OwnedMailbox,
    caps_from_bytes,
    caps_to_bytes,
    delete_public,
    new_delete_seed,
)

URL = "ws://127.0.0.1:1/v1/ws"


def _mb(delete_seed: bytes = b"") -> OwnedMailbox:
    return OwnedMailbox(URL, bytes(32), bytes(32), b"o" * 16, b"d" * 16, bytes(32), b"t",
                        delete_seed)  # fmt: skip


def test_a_descriptor_keeps_its_delete_key_and_an_old_one_has_none() -> None:
    seed = new_delete_seed()
    mb = _mb(seed)
    again = OwnedMailbox.from_bytes(mb.to_bytes())
    assert again == mb and again.delete_seed == seed
    old = json.loads(_mb().to_bytes())
    assert "delete_seed" not in old  # a descriptor without one is written as before
    assert OwnedMailbox.from_bytes(json.dumps(old).encode()).delete_cap() is None
    cap = mb.delete_cap()
    assert cap is not None and (cap.relay_url, cap.owner_id) == (URL, b"o" * 16)
    # The descriptor a removal queues signs with the delete key, never the owner key.
    deleting = cap.as_mailbox()
    assert bytes(deleting.signing_key.verify_key) == delete_public(seed)
    assert deleting.owner_id == mb.owner_id and deleting.box_secret == b""
    assert seed.hex() not in repr(cap) and seed.hex() not in repr(deleting)


def test_capabilities_round_trip_and_malformed_ones_are_refused() -> None:
    caps = [DeleteCap(URL, bytes([i]) * 16, bytes(SigningKey.generate())) for i in range(3)]
    assert caps_from_bytes(caps_to_bytes(caps)) == caps
    assert caps_from_bytes(b"") == []
    good = caps[0].to_json()
    for bad in (
        b"{}", b"not json", json.dumps([good] * 17).encode(),
        json.dumps([{**good, "extra": "x"}]).encode(),
        json.dumps([{**good, "owner_id": "00" * 15}]).encode(),
        json.dumps([{**good, "delete_key": "zz" * 32}]).encode(),
        json.dumps([{**good, "relay_url": ""}]).encode(),
        json.dumps([{**good, "relay_url": "x" * 513}]).encode(),
        json.dumps([{**good, "owner_id": 5}]).encode(),
    ):
        with pytest.raises(ValueError):
            caps_from_bytes(bad)
