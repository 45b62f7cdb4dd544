"""Mailbox lifecycle, deposits, push, queue, fetch/ack, re-encryption, tokens, bundles, blobs."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
from collections.abc import Callable

import pytest
from nacl.public import PrivateKey

from relay import pow as pow_
from relay import wire
from relay.client import RelayClient, RelayError

from .conftest import ROOT, RelayProcess, run
from .helpers import block, new_owner, next_message


def test_block_size_matches_protocol_core() -> None:
    from aegisd.core.wire import BLOCK_SIZE

    assert wire.BLOCK_SIZE == BLOCK_SIZE


def test_relay_imports_nothing_from_daemon() -> None:
    for path in (ROOT / "relay").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in {"aegisd", "aegis_cli", "aegis_bridge"}
                           for n in names), path


@pytest.mark.both_backends
def test_lifecycle_push_ack_delete(relay: RelayProcess) -> None:
    async def body() -> None:
        owner_c = await RelayClient.connect(relay.url)
        sender = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        alice = await new_owner(owner_c, token=token)
        assert alice.owner_id != alice.deposit_id
        await alice.subscribe(owner_c)
        b = block(b"first")
        await sender.deposit(alice.deposit_id, b, token=token)
        m = await next_message(owner_c)
        assert m.owner_id == alice.owner_id
        # Re-encrypted: the delivered bytes differ and share no run with the deposit.
        assert m.sealed != b and len(m.sealed) == wire.SEALED_BLOCK_LEN
        assert b[100:132] not in m.sealed
        assert alice.open(m) == b
        await owner_c.ack([m.msg_id])
        with pytest.raises(RelayError) as e:  # acknowledged once: gone
            await owner_c.ack([m.msg_id])
        assert e.value.code == wire.E_UNKNOWN_MESSAGE
        assert await alice.fetch(sender) == []
        await owner_c.delete(alice.owner_id, alice.sig)
        with pytest.raises(RelayError) as e:
            await sender.deposit(alice.deposit_id, block(), token=token)
        assert e.value.code == wire.E_DENIED
        with pytest.raises(RelayError) as e:
            await alice.subscribe(owner_c)
        assert e.value.code == wire.E_DENIED
        await owner_c.close()
        await sender.close()

    run(body())


@pytest.mark.both_backends
def test_offline_queue_then_subscribe_in_order(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        bob = await new_owner(c, token=token)
        blocks = [block(bytes([i])) for i in range(5)]
        for b in blocks:
            await c.deposit(bob.deposit_id, b, token=token)
        await c.close()
        # Unacknowledged blocks come back on every new connection until acknowledged.
        for _ in range(2):
            c = await RelayClient.connect(relay.url)
            await bob.subscribe(c)
            got = [await next_message(c) for _ in blocks]
            assert [bob.open(m) for m in got] == blocks
            await c.close()
        c = await RelayClient.connect(relay.url)
        got = await bob.fetch(c)
        assert [bob.open(m) for m in got] == blocks
        await c.ack([m.msg_id for m in got])
        assert await bob.fetch(c) == []
        await c.close()

    run(body())


@pytest.mark.both_backends
def test_window_and_backlog_drain(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        assert c.hello is not None
        window = c.hello.window
        token = os.urandom(32)
        o = await new_owner(c, token=token)
        n = window * 2 + 3
        blocks = [block(i.to_bytes(2, "big")) for i in range(n)]
        await asyncio.gather(*(c.deposit(o.deposit_id, b, token=token) for b in blocks[:n // 2]))
        await o.subscribe(c)
        for b in blocks[n // 2:]:
            await c.deposit(o.deposit_id, b, token=token)
        seen = []
        while len(seen) < n:
            m = await next_message(c)
            seen.append(o.open(m))
            await c.ack([m.msg_id])
        assert sorted(seen) == sorted(blocks)
        assert await o.fetch(c) == []
        await c.close()

    run(body())


@pytest.mark.both_backends
def test_token_and_pow_checks(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        private = await new_owner(c, token=token)
        public = await new_owner(c, public=True)
        missing = os.urandom(16)
        codes = []
        for dep, tok in ((private.deposit_id, os.urandom(32)), (missing, token),
                         (private.deposit_id, None), (missing, None),
                         (public.deposit_id, token)):
            with pytest.raises(RelayError) as e:
                await c.deposit(dep, block(), token=tok)
            codes.append(e.value.code)
        # Wrong token, missing mailbox, proof of work to a private mailbox: one answer.
        assert codes == [wire.E_DENIED] * 5
        await c.deposit(public.deposit_id, block())  # proof of work suffices
        # A nonce that is not a proof of work.
        b = block()
        assert c.hello is not None
        nonce = bad_nonce(c.hello.pow_deposit_bits, c.challenge, wire.POW_DEPOSIT,
                          public.deposit_id, hashlib.sha256(b).digest())
        with pytest.raises(RelayError) as e:
            await c.request(wire.DEPOSIT,
                            public.deposit_id + bytes([wire.AUTH_POW]) + nonce + b)
        assert e.value.code == wire.E_BAD_POW
        await c.deposit(private.deposit_id, block(), token=token)
        await c.token_del(private.owner_id, private.sig, token)
        with pytest.raises(RelayError) as e:
            await c.deposit(private.deposit_id, block(), token=token)
        assert e.value.code == wire.E_DENIED
        await c.close()

    run(body())


def bad_nonce(bits: int, challenge: bytes, purpose: int, target: bytes, h: bytes) -> bytes:
    """A nonce that is not a valid proof of work."""
    while True:
        nonce = os.urandom(16)
        if not pow_.check(bits, challenge, purpose, target, h, nonce):
            return nonce


@pytest.mark.both_backends
def test_pow_reuse_rejected(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        o = await new_owner(c, public=True)
        assert c.hello is not None
        b = block()
        nonce = pow_.solve(c.hello.pow_deposit_bits, c.challenge, wire.POW_DEPOSIT,
                           o.deposit_id, hashlib.sha256(b).digest())
        frame = o.deposit_id + bytes([wire.AUTH_POW]) + nonce + b
        await c.request(wire.DEPOSIT, frame)
        with pytest.raises(RelayError) as e:
            await c.request(wire.DEPOSIT, frame)
        assert e.value.code == wire.E_BAD_POW
        # A proof is bound to the connection's challenge: worthless on another connection
        # (unless it happens to meet the difficulty by chance there too).
        c2 = await RelayClient.connect(relay.url)
        if not pow_.check(c2.hello.pow_deposit_bits if c2.hello else 0, c2.challenge,
                          wire.POW_DEPOSIT, o.deposit_id, hashlib.sha256(b).digest(), nonce):
            with pytest.raises(RelayError) as e:
                await c2.request(wire.DEPOSIT, frame)
            assert e.value.code == wire.E_BAD_POW
        await c.close()
        await c2.close()

    run(body())


@pytest.mark.both_backends
def test_subscription_moves_to_newer_connection(relay: RelayProcess) -> None:
    async def body() -> None:
        c1 = await RelayClient.connect(relay.url)
        c2 = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o = await new_owner(c1, token=token)
        await o.subscribe(c1)
        await o.subscribe(c2)
        assert await asyncio.wait_for(c1.ended.get(), 10) == o.owner_id
        b = block()
        await c1.deposit(o.deposit_id, b, token=token)
        assert o.open(await next_message(c2)) == b
        assert c1.messages.empty()
        await c1.close()
        await c2.close()

    run(body())


@pytest.mark.both_backends
def test_bundle_fetch_consumes_one_time_items(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        o = await new_owner(c, public=True)
        base = os.urandom(1482)
        xs = [os.urandom(38) for _ in range(2)]
        ms = [os.urandom(1254)]
        await c.bundle_base(o.owner_id, o.sig, base)
        assert await c.bundle_add(o.owner_id, o.sig, wire.ITEM_X25519, xs) == (2, 0)
        assert await c.bundle_add(o.owner_id, o.sig, wire.ITEM_MLKEM, ms) == (2, 1)
        fetcher = await RelayClient.connect(relay.url)
        # Each item once, in no particular order (the relay keeps none).
        first = await fetcher.bundle_fetch(o.deposit_id)
        second = await fetcher.bundle_fetch(o.deposit_id)
        assert (first[0], first[2], second[0], second[2]) == (base, ms[0], base, None)
        assert sorted([first[1], second[1]]) == sorted(xs)  # type: ignore[type-var]
        assert await fetcher.bundle_fetch(o.deposit_id) == (base, None, None)  # last resort
        assert await c.bundle_status(o.owner_id, o.sig) == (0, 0)
        with pytest.raises(RelayError) as e:
            await fetcher.bundle_fetch(os.urandom(16))
        assert e.value.code == wire.E_DENIED
        # Bounded count per kind.
        with pytest.raises(RelayError) as e:
            for _ in range(5):
                await c.bundle_add(o.owner_id, o.sig, wire.ITEM_X25519,
                                   [os.urandom(38) for _ in range(50)])
        assert e.value.code == wire.E_LIMIT
        assert await c.bundle_status(o.owner_id, o.sig) == (200, 0)
        # Bundle fetch requires its proof of work.
        assert fetcher.hello is not None
        nonce = bad_nonce(fetcher.hello.pow_bundle_bits, fetcher.challenge, wire.POW_BUNDLE,
                          o.deposit_id, pow_.ZERO_HASH)
        with pytest.raises(RelayError) as e:
            await fetcher.request(wire.BUNDLE_FETCH, o.deposit_id + nonce)
        assert e.value.code == wire.E_BAD_POW
        await c.close()
        await fetcher.close()

    run(body())


@pytest.mark.both_backends
def test_blob_area(relay: RelayProcess) -> None:
    async def body() -> None:
        up = await RelayClient.connect(relay.url)
        down = await RelayClient.connect(relay.url)
        with pytest.raises(RelayError) as e:  # no quota yet
            await up.blob_put(os.urandom(16), os.urandom(32), block())
        assert e.value.code == wire.E_LIMIT
        assert await up.blob_quota(8192) == 8192
        cap = os.urandom(32)
        ids = [os.urandom(16) for _ in range(3)]
        blocks = [block() for _ in ids]
        for i, b in zip(ids, blocks, strict=True):
            await up.blob_put(i, cap, b)
        with pytest.raises(RelayError) as e:
            await up.blob_put(ids[0], cap, block())
        assert e.value.code == wire.E_EXISTS
        key = PrivateKey.generate()
        for i, b in zip(ids, blocks, strict=True):
            assert await down.blob_get(i, cap, key) == b
        codes = []
        for blob_id, c in ((ids[0], os.urandom(32)), (os.urandom(16), cap)):
            with pytest.raises(RelayError) as e:
                await down.blob_get(blob_id, c, key)
            codes.append(e.value.code)
        assert codes == [wire.E_DENIED, wire.E_DENIED]
        await down.blob_del(ids[0], cap)
        with pytest.raises(RelayError):
            await down.blob_get(ids[0], cap, key)
        await up.close()
        await down.close()

    run(body())


@pytest.mark.both_backends
def test_health_and_sigterm(relay: RelayProcess) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{relay.port}/health", timeout=10) as r:
        assert r.status == 200

    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o = await new_owner(c, token=token)
        await o.subscribe(c)
        await c.deposit(o.deposit_id, block(), token=token)
        await next_message(c)  # delivered, not acknowledged
        code = await asyncio.to_thread(relay.terminate)
        await asyncio.wait_for(c.closed.wait(), 10)
        assert c.ws.close_code == 1001  # going away
        assert code == 0
        await c.close()

    run(body())
    assert "relay stopped" in relay.output()
    assert "Traceback" not in relay.output()


def test_help_documents_every_option() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "relay.main", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    import dataclasses

    from relay.config import Config
    for f in dataclasses.fields(Config):
        name = "--data" if f.name == "data_dir" else "--" + f.name.replace("_", "-")
        assert name in out, name


def test_protocol_document_covers_frames_errors_options() -> None:
    import dataclasses

    from relay.config import Config
    doc = (ROOT / "docs" / "relay-protocol.md").read_text()
    names = ["HELLO", "CREATE", "SUBSCRIBE", "UNSUBSCRIBE", "FETCH", "ACK", "DELETE",
             "TOKEN_ADD", "TOKEN_DEL", "BUNDLE_BASE", "BUNDLE_ADD", "BUNDLE_STATUS",
             "BUNDLE_FETCH", "DEPOSIT", "BLOB_QUOTA", "BLOB_PUT", "BLOB_GET", "BLOB_DEL", "OK",
             "HELLO_OK", "CREATED", "BUNDLE_COUNT", "BUNDLE", "BLOB", "MSG", "END", "ERROR"]
    assert {getattr(wire, n) for n in names} >= wire.CLIENT_TYPES
    for name in names:
        assert f"| 0x{getattr(wire, name):02X} | `{name}` |" in doc, name
    for code in wire.ERROR_TEXT:
        assert f"| {code} | `" in doc, code
    for f in dataclasses.fields(Config):
        name = "--data" if f.name == "data_dir" else "--" + f.name.replace("_", "-")
        assert f"`{name}`" in doc, name
    assert str(wire.BLOCK_SIZE) in doc and str(wire.SEALED_BLOCK_LEN) in doc



@pytest.mark.both_backends
def test_pipelined_requests_beyond_max_inflight(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(max_inflight=4)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        owners = [await new_owner(c, token=token) for _ in range(2)]
        blocks = [block(i.to_bytes(2, "big")) for i in range(60)]
        await asyncio.gather(*(c.deposit(owners[i % 2].deposit_id, b, token=token)
                               for i, b in enumerate(blocks)))
        got = []
        for o in owners:
            got += await o.fetch(c, 12)
        # One ACK spanning two mailboxes.
        await c.ack([m.msg_id for m in got])
        rest = []
        for o in owners:
            while msgs := await o.fetch(c):
                rest += [o.open(m) for m in msgs]
                await c.ack([m.msg_id for m in msgs])
        opened = [owners[0].open(m) if m.owner_id == owners[0].owner_id else owners[1].open(m)
                  for m in got]
        assert sorted(opened + rest) == sorted(blocks)
        await c.close()

    run(body())
