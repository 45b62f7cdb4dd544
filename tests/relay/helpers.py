"""Shared helpers for the relay tests: owners with their keys, blocks."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from relay import wire
from relay.client import Created, Message, RelayClient


@dataclass
class Owner:
    sig: SigningKey
    box: PrivateKey
    created: Created

    @property
    def owner_id(self) -> bytes:
        return self.created.owner_id

    @property
    def deposit_id(self) -> bytes:
        return self.created.deposit_id

    def open(self, m: Message) -> bytes:
        return m.open(self.box, self.created.relay_box_pub)

    async def subscribe(self, c: RelayClient) -> None:
        await c.subscribe(self.owner_id, self.sig)

    async def fetch(self, c: RelayClient, n: int = 32) -> list[Message]:
        return await c.fetch(self.owner_id, self.sig, n)


async def new_owner(c: RelayClient, public: bool = False, token: bytes | None = None) -> Owner:
    sig, box = SigningKey.generate(), PrivateKey.generate()
    created = await c.create(sig, bytes(box.public_key), public=public)
    owner = Owner(sig, box, created)
    if token is not None:
        await c.token_add(owner.owner_id, sig, token)
    return owner


def block(tag: bytes = b"") -> bytes:
    b = tag + os.urandom(wire.BLOCK_SIZE - len(tag))
    assert len(b) == wire.BLOCK_SIZE
    return b


async def next_message(c: RelayClient, timeout: float = 10) -> Message:
    return await asyncio.wait_for(c.messages.get(), timeout)
