"""A relay from before delete keys (docs/relay-protocol.md §11): it answers a CREATE with a
delete key `bad_frame` and closes. Played by a real relay started with `--delete-keys false`,
which refuses them the same way. The daemon makes its mailboxes again without one, remembers
that relay for the run, says so in one fixed log line, and messaging works."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from aegisd.services.mailbox import OwnedMailbox
from aegisd.store import open_profile
from relay import wire
from relay.client import RelayClient, RelayError
from tests.functional.test_devices import texts
from tests.relay.conftest import RelayProcess

from .conftest import Peer, connect

LINE = "the relay refused a mailbox with a delete key (a relay older than delete keys)"


@pytest.fixture
def older_relay(tmp_short: Path) -> Iterator[RelayProcess]:
    sub = tmp_short / "older"
    sub.mkdir()
    rp = RelayProcess(sub, {"--delete-keys": "false"})
    rp.start()
    try:
        yield rp
    finally:
        rp.close()


def test_the_relay_option_refuses_a_delete_key_as_an_older_relay(
    older_relay: RelayProcess,
) -> None:
    async def go() -> None:
        url = f"ws://127.0.0.1:{older_relay.port}/v1/ws"
        client = await RelayClient.connect(url)
        key = SigningKey.generate()
        box = bytes(PrivateKey.generate().public_key)
        with pytest.raises(RelayError) as info:
            await client.create(key, box, delete_pub=bytes(SigningKey.generate().verify_key))
        assert info.value.code == wire.E_BAD_FRAME
        await client.close()
        client = await RelayClient.connect(url)  # without one: made
        try:
            created = await client.create(key, box)
            assert len(created.owner_id) == wire.ID_LEN
        finally:
            await client.close()

    asyncio.run(go())


def test_a_daemon_makes_its_mailboxes_without_delete_keys_at_an_older_relay(
    tmp_short: Path, older_relay: RelayProcess
) -> None:
    url = f"ws://127.0.0.1:{older_relay.port}/v1/ws"
    alice, bob = Peer(tmp_short / "alice", url, "alice"), Peer(tmp_short / "bob", url, "bob")
    try:
        connect(alice, bob)
        alice.call("messages.send", {"contact": "bob", "text": "through an older relay"})
        bob.wait_for(lambda: ("in", "through an older relay") in texts(bob, "alice"), "it")
        bob.call("messages.send", {"contact": "alice", "text": "and back"})
        alice.wait_for(lambda: ("in", "and back") in texts(alice, "bob"), "the answer")
        for p in (alice, bob):
            p.stop()
            assert p.proc is not None
            log = p.proc.stderr()
            # Once per run: the relay is remembered, its later mailboxes made without asking.
            assert log.count(LINE) == 1, log[-3000:]
            store = open_profile(p.home, None)
            try:
                rows = store.list_mailboxes()
                assert rows
                assert all(OwnedMailbox.from_bytes(r.descriptor).delete_seed == b""
                           for r in rows)  # fmt: skip
            finally:
                store.close()
    finally:
        alice.stop()
        bob.stop()
